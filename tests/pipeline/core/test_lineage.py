"""Shard lineage: per-shard kept joins, not-ready shards, and incremental reruns across stages."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from decision_factory import scored_uids, write_dedup, write_select_shard
from download_factory import demo_rows, tiny_clip_dir, write_download_run, write_download_shard

from captioning.config import CaptionConfig
from captioning.stage import CaptionStage, run_caption
from dedup.config import DedupConfig
from dedup.stage import run_dedup_for_run
from pipeline.core.lineage import NotReady, iter_kept_rows, plan_lineage
from pipeline.core.manifest import MANIFEST_SUFFIX
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.encode.buckets import BucketConfig
from pipeline.encode.stage import EncodeConfig, EncodeStage, run_encode
from pipeline.encode.training_shards import DatasetManifest
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards

pytestmark = pytest.mark.timeout(240)


def kept(run_dir: Path, reads=("select", "dedup")) -> dict[str, list[str]]:
    plan = plan_lineage(run_dir, reads)
    return {
        s.shard: [u for b in iter_kept_rows(s, 2, ["uid"]) for u in b["uid"].to_pylist()]
        for s in plan.shards
    }


def test_kept_is_a_per_shard_join_of_the_decisions_that_ran(tmp_path):
    write_download_run(tmp_path, shards=2, rows=4)  # row 3 of each shard failed to download
    assert kept(tmp_path) == {
        "00000": ["s000r0000", "s000r0001", "s000r0002"],
        "00001": ["s001r0000", "s001r0001", "s001r0002"],
    }  # no select/dedup
    write_select_shard(
        tmp_path, "00000", {u: u != "s000r0001" for u in scored_uids(tmp_path, "00000")}
    )
    write_select_shard(tmp_path, "00001", {u: True for u in scored_uids(tmp_path, "00001")})
    write_dedup(
        tmp_path,
        {
            "00000": {"s000r0000": "kept", "s000r0001": None, "s000r0002": "kept"},
            "00001": {"s001r0000": "dropped", "s001r0001": "kept", "s001r0002": "kept"},
        },
    )
    assert kept(tmp_path) == {
        "00000": ["s000r0000", "s000r0002"],
        "00001": ["s001r0001", "s001r0002"],
    }
    spec = plan_lineage(tmp_path, ("select", "dedup")).shards[1]
    assert set(spec.checksums) == {
        "download/00001.parquet",
        "download/00001.tar",
        "select/00001.parquet",
        "dedup/00001.parquet",
    }


def test_a_stage_that_ran_but_lacks_a_shard_makes_it_not_ready(tmp_path):
    write_download_run(tmp_path, shards=3, rows=2, failures_every=0)
    write_select_shard(tmp_path, "00001", {u: True for u in scored_uids(tmp_path, "00001")})
    plan = plan_lineage(tmp_path, ("select", "dedup"))
    assert [s.shard for s in plan.shards] == ["00001"]  # dedup never ran: not applied
    assert plan.missing == {"select": ["00000", "00002"]}
    error = plan.not_ready("caption")
    assert isinstance(error, NotReady)
    assert "2 shard(s) not ready" in str(error) and "00000, 00002" in str(error)
    assert "select" in str(error)


def _stamps(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """Each manifest's (inode, mtime): a rewritten manifest is a new file."""
    return {
        p.name[: -len(MANIFEST_SUFFIX)]: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in stage_dir.glob(f"*{MANIFEST_SUFFIX}")
    }


def _redone(before: dict, after: dict) -> list[str]:
    return sorted(s for s in after if before.get(s) != after[s])


STAGES = ("score", "dedup", "caption", "encode")


def test_one_changed_shard_redoes_exactly_its_descendants(
    tmp_path, request, tmp_path_factory, tiny_models
):
    run_dir = tmp_path / "run"
    write_download_run(run_dir, shards=3, rows=4)
    score = ScoreConfig(
        model=f"local-dir:{tiny_clip_dir(request, tmp_path_factory)}",
        batch_size=4,
        decode_threads=1,
    )
    caption = CaptionConfig(
        model=str(tiny_models / "captioner"), batch_size=4, image_size=64, decode_threads=1
    )
    caption.generation.max_new_tokens = 4
    caption.cleaning.reject_repetitive = False
    encode = EncodeConfig(
        model=str(tiny_models / "sd3"),
        bucket=BucketConfig(resolution=64, multiple=16),
        batch_size=4,
        decode_threads=1,
    )
    dedup = DedupConfig(semantic=False, sweep=False, perceptual=False)  # exact: sha256 only

    def select(shard: str, drop: set[str] = frozenset()) -> None:
        write_select_shard(run_dir, shard, {u: u not in drop for u in scored_uids(run_dir, shard)})

    def curate(reselect: tuple[str, ...] = ()) -> dict[str, list[str]]:
        before = {stage: _stamps(run_dir / stage) for stage in STAGES}
        run_stage(
            lambda: ClipScorer(score),
            score_shards(run_dir / "download"),
            run_dir / "score",
            RunnerConfig(),
        )
        for shard in reselect:  # what select does for a shard whose score changed
            select(shard)
        dedup_ran = run_dedup_for_run(dedup, run_dir).ran
        run_caption(caption, run_dir)
        run_encode(encode, run_dir)
        redone = {stage: _redone(before[stage], _stamps(run_dir / stage)) for stage in STAGES}
        assert redone.pop("dedup") == (["dedup"] if dedup_ran else [])
        return redone | {"dedup": dedup_ran}

    for shard in ("00000", "00001", "00002"):
        select(shard)
    first = curate()
    assert first == {
        "score": ["00000", "00001", "00002"],
        "caption": ["00000", "00001", "00002"],
        "encode": ["00000", "00001", "00002"],
        "dedup": True,
    }

    # A no-op rerun decides from manifests alone: no model stage is even set up.
    def no_setup(self):
        raise AssertionError(f"{type(self).__name__}.setup() ran on a no-op rerun")

    with pytest.MonkeyPatch.context() as patch:
        for stage in (ClipScorer, CaptionStage, EncodeStage):
            patch.setattr(stage, "setup", no_setup)
        assert curate() == {"score": [], "caption": [], "encode": [], "dedup": False}
    assert DatasetManifest.load(run_dir / "encode").counts["samples"] > 0

    # One download shard changes (a caption edited, as a --retry-failed rewrite would): its
    # score, caption and encode shards are redone; dedup reruns, but its tables for the other
    # shards are byte-identical, so nothing else downstream is.
    rows = demo_rows(1, 4)
    rows[0].caption = "a different caption"
    write_download_shard(run_dir / "download", "00001", rows)
    assert curate(reselect=("00001",)) == {
        "score": ["00001"],
        "caption": ["00001"],
        "encode": ["00001"],
        "dedup": True,
    }

    # One select shard changes: dedup reruns; only shard 2's decisions change downstream.
    select("00002", drop={"s002r0000"})
    assert curate() == {"score": [], "caption": ["00002"], "encode": ["00002"], "dedup": True}
    captioned = pq.read_table(run_dir / "caption" / "00002.parquet")["uid"].to_pylist()
    assert captioned == ["s002r0001", "s002r0002"]
