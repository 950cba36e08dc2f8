"""`rectiflow inspect`: the funnel per stage and reason, and "why was uid X dropped?"."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_factory import write_download_run

from pipeline.core.manifest import ShardManifest, shard_outputs
from pipeline.inspect.cli import main as inspect_main
from pipeline.inspect.funnel import explain_uid, format_story, funnel
from pipeline.select.stage import SelectConfig, run_select

pytestmark = pytest.mark.timeout(60)


def write_stage(run_dir: Path, stage: str, shard: str, table: pa.Table) -> None:
    manifest = ShardManifest(stage=stage, shard=shard, config_hash="test", rows_in=table.num_rows)
    with shard_outputs(run_dir / stage, manifest, []) as outputs:
        pq.write_table(table, outputs.path(f"{shard}.parquet"))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """download (2 x 8 rows, 4 failed) -> score (1 undecodable) -> select -> dedup -> caption."""
    write_download_run(tmp_path, shards=2, rows=8, failures_every=4)
    for shard in ("00000", "00001"):
        download = pq.read_table(tmp_path / "download" / f"{shard}.parquet").to_pylist()
        uids = [r["uid"] for r in download if r["download_status"] == "success"]
        write_stage(tmp_path, "score", shard, pa.table({
            "uid": uids,
            "score_reason": ["decode_error" if u == "s000r0001" else None for u in uids],
            "score_clip": [0.1 if u == "s001r0000" else 0.3 for u in uids],
            "score_aesthetic": pa.array([None] * len(uids), pa.float32()),
            "score_nsfw": pa.array([None] * len(uids), pa.float32()),
            "score_width": [640] * len(uids), "score_height": [480] * len(uids),
            "score_caption_length": [20] * len(uids), "score_caption_words": [4] * len(uids),
        }))
    run_select(tmp_path, SelectConfig(clip_min=0.2))
    kept = pq.read_table(tmp_path / "select" / "kept.parquet").to_pylist()
    uids = [r["uid"] for r in kept if r["select_kept"]]
    duplicate, original = "s000r0005", "s000r0000"
    write_stage(tmp_path, "dedup", "00000", pa.table({
        "uid": uids,
        "dedup_status": ["duplicate" if u == duplicate else "kept" for u in uids],
        "dedup_reason": ["near_duplicate" if u == duplicate else None for u in uids],
        "dedup_representative": [original if u == duplicate else None for u in uids],
        "dedup_similarity": [0.97 if u == duplicate else None for u in uids],
    }))
    survivors = [u for u in uids if u != duplicate]
    write_stage(tmp_path, "caption", "00000", pa.table({
        "uid": survivors,
        "caption_text": ["a photo"] * len(survivors),
        "caption_reason": ["empty_caption" if u == "s001r0002" else None for u in survivors],
    }))
    return tmp_path


def test_funnel_counts_every_stage_and_reason(run_dir):
    counts = {c.stage: c for c in funnel(run_dir)}
    assert list(counts) == ["download", "score", "select", "dedup", "caption"]
    assert (counts["download"].rows_in, counts["download"].rows_out) == (16, 12)
    assert counts["download"].reasons == {"http_404": 4}
    assert (counts["score"].rows_in, counts["score"].rows_out) == (12, 11)
    assert (counts["select"].rows_in, counts["select"].rows_out) == (11, 10)
    assert counts["select"].reasons == {"clip_low": 1}
    assert (counts["dedup"].rows_in, counts["dedup"].rows_out) == (10, 9)
    assert counts["caption"].reasons == {"empty_caption": 1}


def test_why_was_a_uid_dropped(run_dir):
    story = format_story("s000r0005", explain_uid(run_dir, "s000r0005"))
    assert story.splitlines()[0] == (
        "uid s000r0005 was dropped by dedup: near_duplicate: a near-duplicate of uid s000r0000, "
        "similarity 0.97"
    )
    assert "caption    no row: dropped by dedup before" in story
    select_story = format_story("s001r0000", explain_uid(run_dir, "s001r0000"))
    assert "dropped by select: clip_low (score_clip=0.1 < 0.2)" in select_story
    assert "dropped by download: http_404" in format_story("s000r0003", explain_uid(run_dir, "s000r0003"))
    assert "dropped by score: decode_error" in format_story("s000r0001", explain_uid(run_dir, "s000r0001"))
    assert "kept by every stage" in format_story("s000r0000", explain_uid(run_dir, "s000r0000"))
    assert "not in this run" in format_story("nope", explain_uid(run_dir, "nope"))


def test_cli_prints_the_funnel_and_answers_for_uids(run_dir, capsys):
    assert inspect_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "http_404" in out and "near_duplicate" in out and "empty_caption" in out
    assert inspect_main([str(run_dir), "--uid", "s001r0002", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["s001r0002"][-1]["reason"] == "empty_caption"
    assert inspect_main([str(run_dir), "--uid", "missing"]) == 1
