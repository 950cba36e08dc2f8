"""`optim.mixed_precision = "auto"`: bf16 only where the device has it natively, and recorded."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from shard_factory import DatasetSpec, write_dataset
from train_helpers import REPO, TINY, single_thread, subprocess_env  # noqa: F401 (fixture)

from pipeline.core import devices
from train.config import OptimConfig, load_train_config
from train.precision import resolve_mixed_precision
from train.trainer import Trainer

CPU = torch.device("cpu")


def fake_probe(monkeypatch, native: bool) -> list[torch.device]:
    asked = []

    def probe(device):
        asked.append(device)
        return native, "faked"

    monkeypatch.setattr(devices, "native_bf16", probe)
    return asked


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_follows_the_probe_and_keeps_the_request(monkeypatch, native, expected):
    asked = fake_probe(monkeypatch, native)
    resolved, note = resolve_mixed_precision(OptimConfig(), CPU)
    assert asked == [CPU]
    assert resolved.mixed_precision == expected and resolved.mixed_precision_requested == "auto"
    assert note == f"mixed precision: auto -> {expected} (faked)"


@pytest.mark.parametrize(("explicit", "native"), [("bf16", False), ("no", True)])
def test_explicit_values_win_without_asking_the_probe(monkeypatch, explicit, native):
    asked = fake_probe(monkeypatch, native)
    resolved, note = resolve_mixed_precision(OptimConfig(mixed_precision=explicit), CPU)
    assert asked == []
    assert resolved.mixed_precision == explicit and resolved.mixed_precision_requested is None
    assert note == f"mixed precision: {explicit} (explicit)"


def test_the_cpu_probe_reads_the_flags_and_falls_back_to_fp32_without_them(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(devices, "CPUINFO", cpuinfo)
    assert devices.native_bf16(CPU) == (False, "cpu flags unknown (no /proc/cpuinfo)")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n")
    assert devices.native_bf16(CPU) == (False, "cpu without avx512_bf16/amx_bf16")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert devices.native_bf16(CPU) == (True, "cpu with avx512_bf16/amx_bf16")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_the_real_cpu_probe_agrees_with_proc_cpuinfo():
    flags_lines = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags")]
    words = set(flags_lines[0].split(":", 1)[1].split())
    native, why = devices.native_bf16(CPU)
    assert native == bool(words & {"avx512_bf16", "amx_bf16"}), why


def tiny_run(tmp_path: Path) -> list[str]:
    dataset = tmp_path / "data"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[4], buckets=[(64, 64)]))
    return [f"--data.path={dataset}", f"--run.output_dir={tmp_path / 'run'}", "--run.max_steps=1",
            "--data.batch_size=2", "--logging.tensorboard=false", "--checkpoint.every=1"]


def resolved_optim(run_dir: Path) -> dict:
    return tomllib.loads((run_dir / "config.resolved.toml").read_text())["optim"]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("single_thread")
def test_an_auto_run_without_native_bf16_trains_and_records_fp32(tmp_path, monkeypatch, caplog):
    fake_probe(monkeypatch, native=False)
    sections = load_train_config(str(TINY), tiny_run(tmp_path))
    assert sections["optim"].mixed_precision == "auto"  # the preset's request
    with caplog.at_level("INFO", logger="train.trainer"):
        trainer = Trainer(sections)
    assert trainer.accelerator.mixed_precision == "no"
    assert "mixed precision: auto -> no (faked)" in caplog.text
    trainer.fit()
    optim = resolved_optim(tmp_path / "run")
    assert optim["mixed_precision"] == "no" and optim["mixed_precision_requested"] == "auto"
    # the resolved file is a valid preset again, and pins what ran
    again = load_train_config(str(tmp_path / "run" / "config.resolved.toml"))
    assert again["optim"].mixed_precision == "no"


# A process of its own: accelerate's state is per process and fixes the precision it started with.
FAKED_NATIVE = """
import sys
from pipeline.core import devices
devices.native_bf16 = lambda device: (True, "faked native")
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
def test_an_auto_run_with_native_bf16_trains_in_bf16_and_records_it(tmp_path):
    command = [sys.executable, "-c", FAKED_NATIVE, "--config", str(TINY), *tiny_run(tmp_path)]
    done = subprocess.run(command, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixed precision: auto -> bf16 (faked native)" in done.stderr
    optim = resolved_optim(tmp_path / "run")
    assert optim["mixed_precision"] == "bf16" and optim["mixed_precision_requested"] == "auto"
