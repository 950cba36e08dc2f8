"""Shared helpers of the trainer tests: environment and subprocesses that never outlive a test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train_tiny.toml"


def subprocess_env() -> dict[str, str]:
    # Same thread count as this process, so CPU kernels reduce in the same order (bitwise checks).
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
            "OMP_NUM_THREADS": str(torch.get_num_threads()), "NO_ALBUMENTATIONS_UPDATE": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for `process`; on timeout (or any interruption) kill it and all its descendants,
    since torchrun's ranks live in sessions of their own and would outlive their parent."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except BaseException:
        kill_tree(process.pid)
        process.communicate()
        raise
    return process.returncode, stderr


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", "--config", str(TINY), "--log-level=WARNING", *overrides]


def step_records(run_dir: Path) -> dict[int, dict]:
    """The last logged record of every step (a resumed run appends after the killed one)."""
    records = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


@pytest.fixture
def single_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads spin against each other and
    a tiny MMDiT step took 60x longer (1.6 s vs 25 ms measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
