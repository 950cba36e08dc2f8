# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv when missing and install the project into it; the stamp files make a
# second run skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision first, pinned to the builds these machines carry on local disk; override
# for another platform, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

# Tests that start Ray (marker `ray`) and the namespace's own check (`netns`) run in a private
# network namespace with only loopback (tests/netguard/netns.py: Ray's helpers probe cloud
# metadata at start-up); where namespaces are unavailable it says so and the in-process guard
# alone applies. Both passes run even when the first fails; make fails if either did.
PYTEST := $(PY) -m pytest -q
NETNS := $(PY) tests/netguard/netns.py
IN_NETNS := (ray or netns)
define pytest_both_ways
	rc=0; $(PYTEST) -m "$(1) and not $(IN_NETNS)" || rc=$$?; \
	$(NETNS) $(PYTEST) -m "$(1) and $(IN_NETNS)" || rc=$$?; exit $$rc
endef

.PHONY: demo demo-quick test test-slow lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/rectiflow demo

demo-quick: $(VENV)/.installed
	$(VENV)/bin/rectiflow demo --quick

# everything but `slow` (`.ci/run` runs those after this)
test: $(VENV)/.installed-dev
	$(call pytest_both_ways,not slow)

test-slow: $(VENV)/.installed-dev
	$(call pytest_both_ways,slow)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
