"""Exact resume: N steps straight equal k steps, SIGKILL, resume to N (bitwise on CPU)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shard_factory import DatasetSpec, write_dataset
from train_helpers import (  # noqa: F401 (fixture)
    TINY,
    finish,
    single_thread,
    start,
    step_records,
    train_command,
)

from train.cli import main as train_main

STEPS, KILL_AFTER = 6, 3


def common(dataset: Path, out: Path) -> list[str]:
    return [f"--data.path={dataset}", f"--run.output_dir={out}", "--checkpoint.every=3",
            "--checkpoint.keep_last=5", "--logging.tensorboard=false", "--data.batch_size=2",
            "--optim.schedule=constant", "--ema.decay=0.5"]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("single_thread")
def test_sigkill_then_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    dataset = tmp_path / "data"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[5, 6, 4]))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_main(["--config", str(TINY), *common(dataset, straight),
                       f"--run.max_steps={STEPS}"]) == 0

    # The killed run is told to go far beyond STEPS and is killed once checkpoint 3 exists.
    process = start(train_command(*common(dataset, killed), "--run.max_steps=100000"))
    marker = killed / "checkpoints" / "step-00000003" / "trainer.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    returncode, stderr = finish(process, timeout=30)
    assert marker.exists(), stderr[-3000:]
    assert returncode == -signal.SIGKILL

    resume_from = killed / "checkpoints" / "step-00000003"
    assert train_main(["--config", str(TINY), *common(dataset, killed), f"--run.max_steps={STEPS}",
                       f"--checkpoint.resume={resume_from}"]) == 0

    expected, resumed = step_records(straight), step_records(killed)
    for step in range(1, STEPS + 1):
        assert resumed[step]["keys"] == expected[step]["keys"], step
        assert resumed[step]["loss"] == expected[step]["loss"], step  # bitwise (exact floats)
    for name in ("model.safetensors", "ema.safetensors"):
        ours = load_file(killed / "checkpoints" / f"step-{STEPS:08d}" / name)
        theirs = load_file(straight / "checkpoints" / f"step-{STEPS:08d}" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
