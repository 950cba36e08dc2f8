"""Driver-side planning, output verification and the run-directory lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_factory import write_download_run
from test_stage_framework import CaptionLengthFilter, write_inputs

from pipeline.core.manifest import ShardManifest, manifest_path, read_manifest
from pipeline.core.run_lock import LOCK_NAME, RunLocked, run_lock
from pipeline.core.runners import RunnerConfig, plan_shards, run_stage
from pipeline.score.cli import main as score_main

pytestmark = pytest.mark.timeout(90)
TESTS = Path(__file__).parent
ROOT = TESTS.parents[2]


class CountingFilter(CaptionLengthFilter):
    """Counts `setup` calls (where a model stage loads its model); can refuse to set up."""

    setups = 0

    def __init__(self, min_length: int = 4, refuse_setup: bool = False):
        super().__init__(min_length)
        self.refuse_setup = refuse_setup

    def setup(self) -> None:
        if self.refuse_setup:
            raise AssertionError("setup() ran although every shard was done")
        CountingFilter.setups += 1


def test_a_noop_rerun_never_sets_up_the_stage(tmp_path):
    specs = write_inputs(tmp_path / "in", shards=3, rows=5)
    stage_dir = tmp_path / "run" / "toy"
    CountingFilter.setups = 0
    first = run_stage(lambda: CountingFilter(), specs, stage_dir, RunnerConfig())
    assert CountingFilter.setups == 1
    again = run_stage(lambda: CountingFilter(refuse_setup=True), specs, stage_dir, RunnerConfig())
    assert again == first
    # One shard gone: only that one runs, and the stage is set up once for it.
    manifest_path(stage_dir, "00001").unlink()
    run_stage(lambda: CountingFilter(), specs, stage_dir, RunnerConfig())
    assert CountingFilter.setups == 2


def test_done_means_recorded_sizes_and_verify_rehashes(tmp_path):
    specs = write_inputs(tmp_path / "in", shards=2, rows=5)
    stage_dir = tmp_path / "run" / "toy"
    run_stage(lambda: CaptionLengthFilter(4), specs, stage_dir, RunnerConfig())
    manifest = read_manifest(stage_dir, "00000")
    assert manifest.sizes == {"00000.parquet": (stage_dir / "00000.parquet").stat().st_size}
    fingerprint = CaptionLengthFilter(4).fingerprint()

    # Same size, other bytes: only --verify notices.
    out = stage_dir / "00000.parquet"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    done, todo = plan_shards(specs, stage_dir, fingerprint)
    assert [m.shard for m in done] == ["00000", "00001"] and todo == []
    done, todo = plan_shards(specs, stage_dir, fingerprint, verify=True)
    assert [s.shard for s in todo] == ["00000"]
    # Another size is caught without hashing.
    (stage_dir / "00001.parquet").write_bytes(b"short")
    done, todo = plan_shards(specs, stage_dir, fingerprint)
    assert [s.shard for s in todo] == ["00001"]
    run_stage(lambda: CaptionLengthFilter(4), specs, stage_dir, RunnerConfig(), verify=True)
    assert pq.read_table(out).num_rows == 5  # redone: readable again


def test_recorded_input_checksums_are_compared_not_rehashed(tmp_path):
    (spec,) = write_inputs(tmp_path / "in", shards=1, rows=4)
    spec.checksums = {"upstream/00000.parquet": "a" * 64}
    stage_dir = tmp_path / "run" / "toy"
    run_stage(lambda: CaptionLengthFilter(4), [spec], stage_dir, RunnerConfig())
    assert read_manifest(stage_dir, "00000").inputs == spec.checksums
    # The file itself may change: what counts is what the upstream manifest recorded.
    pq.write_table(pa.table({"uid": ["x"], "caption": ["changed"]}), spec.inputs["table"])
    fingerprint = CaptionLengthFilter(4).fingerprint()
    assert plan_shards([spec], stage_dir, fingerprint)[1] == []
    spec.checksums = {"upstream/00000.parquet": "b" * 64}
    assert plan_shards([spec], stage_dir, fingerprint)[1] == [spec]


def test_an_old_manifest_without_sizes_is_checked_by_sha256(tmp_path):
    specs = write_inputs(tmp_path / "in", shards=1, rows=4)
    stage_dir = tmp_path / "run" / "toy"
    run_stage(lambda: CaptionLengthFilter(4), specs, stage_dir, RunnerConfig())
    path = manifest_path(stage_dir, "00000")
    old = ShardManifest.read(path)
    old.sizes = {}
    path.write_text(__import__("json").dumps(old.__dict__))
    fingerprint = CaptionLengthFilter(4).fingerprint()
    assert plan_shards(specs, stage_dir, fingerprint)[1] == []
    (stage_dir / "00000.parquet").write_bytes(b"x" * (stage_dir / "00000.parquet").stat().st_size)
    assert plan_shards(specs, stage_dir, fingerprint)[1] == specs


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """A second real process that takes the run's lock, leaves a temporary, and waits."""
    code = (
        "import sys, time; from pathlib import Path; from pipeline.core.run_lock import run_lock\n"
        f"d = Path({str(run_dir)!r})\n"
        "with run_lock(d):\n"
        "    (d / 'toy').mkdir(parents=True, exist_ok=True)\n"
        "    (d / 'toy' / '.00000.parquet.tmp-1').write_bytes(b'half a shard')\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    specs = write_inputs(tmp_path / "in", shards=2, rows=4)
    child = _hold_lock_in_child(run_dir)
    try:
        with pytest.raises(RunLocked) as refused:
            run_stage(lambda: CaptionLengthFilter(4), specs, run_dir / "toy", RunnerConfig())
        message = str(refused.value)
        assert str(run_dir.resolve()) in message and f"pid {child.pid}" in message
        assert socket.gethostname() in message
        assert (run_dir / "toy" / ".00000.parquet.tmp-1").exists()  # the holder's file survives
        # A stage command says the same on stderr, exit code 2, before writing anything.
        write_download_run(run_dir, shards=1, rows=2)
        assert score_main([str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"run directory {run_dir.resolve()} is in use by pid {child.pid}" in err
        assert not (run_dir / "score").exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)  # a crash: the kernel releases the flock
        child.wait()
    manifests = run_stage(lambda: CaptionLengthFilter(4), specs, run_dir / "toy", RunnerConfig())
    assert len(manifests) == 2
    assert not (run_dir / "toy" / ".00000.parquet.tmp-1").exists()  # stale, so now removed
    assert (run_dir / LOCK_NAME).exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with run_lock(tmp_path), run_lock(tmp_path):
        specs = write_inputs(tmp_path / "in", shards=1, rows=2)
        run_stage(lambda: CaptionLengthFilter(4), specs, tmp_path / "toy", RunnerConfig())
    with run_lock(tmp_path):  # released after the outer block: can be taken again
        pass
