"""The stage framework: atomic shard outputs, resume, crash-then-rerun, merged stats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core.manifest import manifest_path, read_manifests, sha256_file, stage_stats
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.core.stage import ShardSpec, Stage, run_shard
from pipeline.inspect.funnel import funnel

pytestmark = pytest.mark.timeout(90)
TESTS = Path(__file__).parent


@dataclass
class ToyConfig:
    min_length: int


class CaptionLengthFilter(Stage):
    """A tiny pure stage: drops captions shorter than `min_length` characters."""

    name = "toy"
    batch_size = 4

    def __init__(self, min_length: int, sleep_s: float = 0.0, fail_on_batch: int | None = None):
        super().__init__(ToyConfig(min_length))
        self.sleep_s, self.fail_on_batch, self.batches = sleep_s, fail_on_batch, 0

    def process(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.fail_on_batch == self.batches:
            raise RuntimeError("boom")
        time.sleep(self.sleep_s)
        lengths = pc.utf8_length(batch["caption"])
        short = pc.less(lengths, self.config.min_length)
        reason = pc.if_else(short, pa.scalar("too_short"), pa.scalar(None, pa.string()))
        return pa.table({"uid": batch["uid"], "toy_length": lengths, "toy_reason": reason})


def write_inputs(folder: Path, shards: int = 4, rows: int = 10) -> list[ShardSpec]:
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for s in range(shards):
        uids = [f"s{s}r{i}" for i in range(rows)]
        captions = ["x" * ((s * rows + i) % 9) for i in range(rows)]
        path = folder / f"{s:05d}.parquet"
        pq.write_table(pa.table({"uid": uids, "caption": captions}), path)
        specs.append(ShardSpec(f"{s:05d}", {"table": path}))
    return specs


def run_toy(inputs_dir: str, stage_dir: str, sleep_s: float = 0.0) -> None:
    """Entry point for the crash test's child process."""
    specs = write_inputs(Path(inputs_dir)) if not Path(inputs_dir).exists() else [
        ShardSpec(p.stem, {"table": p}) for p in sorted(Path(inputs_dir).glob("*.parquet"))
    ]
    run_stage(lambda: CaptionLengthFilter(4, sleep_s), specs, Path(stage_dir), RunnerConfig())


def outputs(stage_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(stage_dir.glob("*.parquet"))}


def test_resume_skips_current_shards_and_redoes_changed_ones(tmp_path):
    specs = write_inputs(tmp_path / "in")
    stage_dir = tmp_path / "toy"
    manifests = run_stage(lambda: CaptionLengthFilter(4), specs, stage_dir, RunnerConfig())
    assert [m.shard for m in manifests] == ["00000", "00001", "00002", "00003"]
    stage = CaptionLengthFilter(4)
    assert [run_shard(stage, s, stage_dir)[1] for s in specs] == [False] * 4
    assert stage.batches == 0

    # A changed input, a deleted output and a tampered output are each redone; nothing else.
    pq.write_table(pa.table({"uid": ["new"], "caption": ["a longer caption"]}), specs[0].inputs["table"])
    (stage_dir / "00001.parquet").unlink()
    (stage_dir / "00002.parquet").write_bytes(b"not what the manifest vouches for")
    assert [run_shard(stage, s, stage_dir)[1] for s in specs] == [True, True, True, False]
    assert pq.read_table(stage_dir / "00000.parquet")["uid"].to_pylist() == ["new"]
    # A different config is a different result: every shard is redone.
    stage = CaptionLengthFilter(2)
    assert [run_shard(stage, s, stage_dir)[1] for s in specs] == [True] * 4


def test_a_failing_shard_leaves_no_output_and_no_manifest(tmp_path):
    (spec,) = write_inputs(tmp_path / "in", shards=1, rows=10)
    stage_dir = tmp_path / "toy"
    with pytest.raises(RuntimeError, match="boom"):
        run_shard(CaptionLengthFilter(4, fail_on_batch=2), spec, stage_dir)
    assert sorted(p.name for p in stage_dir.iterdir()) == []
    manifest, ran = run_shard(CaptionLengthFilter(4), spec, stage_dir)
    assert ran and manifest.rows_in == 10


def test_sigkill_mid_run_then_rerun_gives_the_clean_result(tmp_path):
    clean_dir, crash_dir = tmp_path / "clean", tmp_path / "crashed"
    run_toy(str(tmp_path / "in"), str(clean_dir))
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_stage_framework import run_toy; "
        f"run_toy({str(tmp_path / 'in')!r}, {str(crash_dir)!r}, sleep_s=0.3)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS.parents[2])
    try:
        deadline = time.monotonic() + 60
        while not manifest_path(crash_dir, "00000").exists():  # killed after the first shard
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert len(read_manifests(crash_dir)) < 4  # it really died mid-way

    run_toy(str(tmp_path / "in"), str(crash_dir))
    assert outputs(crash_dir) == outputs(clean_dir)  # byte-identical shards
    assert not list(crash_dir.glob(".*"))  # no half-written leftovers
    uids = pa.concat_tables([pq.read_table(p) for p in sorted(crash_dir.glob("*.parquet"))])["uid"]
    assert len(uids) == len(set(uids.to_pylist())) == 40  # nothing lost, nothing twice


def test_stats_merge_across_shards_from_the_manifests(tmp_path):
    specs = write_inputs(tmp_path / "in", shards=3, rows=9)
    stage_dir = tmp_path / "run" / "toy"
    run_stage(lambda: CaptionLengthFilter(4), specs, stage_dir, RunnerConfig())
    stats = stage_stats(stage_dir)
    # Caption lengths cycle 0..8 over each shard's 9 rows: lengths 0-3 are too short.
    assert (stats["shards"], stats["rows_in"], stats["rows_out"]) == (3, 27, 15)
    assert stats["reasons"] == {"too_short": 12}
    assert stats["rows_per_second"] and stats["rows_per_second"] > 0
    (toy,) = funnel(tmp_path / "run")  # the funnel, from the Parquet alone, agrees
    assert (toy.rows_in, toy.rows_out, dict(toy.reasons)) == (27, 15, {"too_short": 12})
