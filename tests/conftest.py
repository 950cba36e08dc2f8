"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import moto_s3, s3_bucket  # noqa: F401 -- fixtures: moto's S3 server on 127.0.0.1

# Tests are hermetic: never reach for a model hub (these must be set before huggingface_hub
# is imported, which reads them once), and keep albumentations from checking for updates.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline tiny-model bundle (seed 0), written once per test session.

    Layout: sd3/ (diffusers StableDiffusion3Pipeline folder), open_clip/ (load with
    model.loading.load_open_clip(path) or open_clip's "local-dir:" schema), captioner/
    (LLaVA; model.loading.load_captioner(path)). Treat it as read-only: it is shared.
    """
    from model.tiny import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_models"), seed=0)


# --- network guard (download tests): only 127.0.0.1 and "localhost", in every test ---------
_NETGUARD_DIR = Path(__file__).parent / "netguard"


def pytest_report_header(config) -> str:
    # `make test` runs the `ray`/`netns` tests through tests/netguard/netns.py, which sets this
    mode = os.environ.get("RECTIFLOW_NETNS", "guard-only")
    return f"network: {mode} (in-process guard in every test; see tests/netguard/netns.py)"


def pytest_sessionfinish(session, exitstatus) -> None:
    """A marker selection that matches nothing (e.g. `-m slow` with no slow tests) passes."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.option.markexpr:
        session.exitstatus = pytest.ExitCode.OK


def _netguard():
    import sys

    if str(_NETGUARD_DIR) not in sys.path:
        sys.path.insert(0, str(_NETGUARD_DIR))
    import netguard

    return netguard


@pytest.fixture(autouse=True)
def network_guard():
    """Fail any test that connects to, sends to, or resolves anything but loopback.

    The socket module is patched in this process; `guarded_children` extends the guard to
    Python child processes. `.invalid` names answer "not found" without a DNS query.
    """
    guard = _netguard()
    guard.install()
    guard.take_violations()
    yield guard
    found = guard.take_violations()
    if found:
        pytest.fail("network guard violations:\n" + "\n".join(found))


@pytest.fixture
def guarded_children(network_guard, tmp_path, monkeypatch):
    """Guard Python child processes too (multiprocessing spawn, subprocess) via sitecustomize.

    Not autouse: Ray's own helper processes probe cloud metadata addresses at start-up,
    which the guard (rightly) reports, so Ray-based tests guard only their driver.
    """
    paths = [str(_NETGUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv(network_guard.LOG_ENV, str(tmp_path / "netguard.log"))
    yield network_guard
    found = network_guard.take_violations()  # reads the children's log while it is still set
    if found:
        pytest.fail("network guard violations in child processes:\n" + "\n".join(found))


@pytest.fixture(scope="session")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    """A LocalImageServer on 127.0.0.1 serving download_assets' photos and bad inputs."""
    from download_assets import write_image_site

    from pipeline.download.local_server import LocalImageServer

    with LocalImageServer(write_image_site(tmp_path_factory.mktemp("image_site"))) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test gets its own accelerate state. accelerate keeps one per process and refuses an
    Accelerator with other settings, and "auto" precision differs by CPU (bf16 with
    AVX512-BF16/AMX): without this, a bf16 trainer test made a later fp32 one fail on such CPUs."""
    yield
    import sys

    if "accelerate.state" in sys.modules:  # never import accelerate for tests that did not
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
