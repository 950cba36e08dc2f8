"""`rectiflow inspect`: the funnel per stage and reason (from the manifests), and "why was uid X
dropped?" (from the uid index or the download uid columns, then one shard per stage)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_factory import write_download_run

from pipeline.core.command import InputError
from pipeline.core.manifest import ShardManifest, shard_outputs
from pipeline.core.uids import UID_INDEX_DIR, uid_bucket
from pipeline.inspect.cli import main as inspect_main
from pipeline.inspect.funnel import explain_uid, find_shard, format_story, funnel
from pipeline.select.stage import SelectConfig, run_select

pytestmark = pytest.mark.timeout(60)
SHARDS = ("00000", "00001")


def write_stage(run_dir: Path, stage: str, shard: str, tables: dict[str, pa.Table]) -> None:
    """A stage's shard (or, for dedup, its one manifest over every shard), counted as stages do."""
    manifest = ShardManifest(stage=stage, shard=shard, config_hash="test")
    reasons: Counter[str] = Counter()
    with shard_outputs(run_dir / stage, manifest, []) as outputs:
        for name, table in tables.items():
            pq.write_table(table, outputs.path(f"{name}.parquet"))
            manifest.rows_in += table.num_rows
            reasons.update(r for r in table[f"{stage}_reason"].to_pylist() if r)
        manifest.reasons = dict(reasons)
        manifest.rows_out = manifest.rows_in - sum(reasons.values())


def write_uid_index(run_dir: Path) -> None:
    """download/_uid_index/BB.parquet (uid, shard), as the download stage writes it."""
    buckets: dict[str, list[tuple[str, str]]] = {}
    for shard in SHARDS:
        for uid in pq.read_table(run_dir / "download" / f"{shard}.parquet")["uid"].to_pylist():
            buckets.setdefault(f"{uid_bucket(uid):02x}", []).append((uid, shard))
    index = run_dir / "download" / UID_INDEX_DIR
    index.mkdir()
    for bucket, rows in buckets.items():
        pq.write_table(pa.table({"uid": [u for u, _ in rows], "shard": [s for _, s in rows]}),
                       index / f"{bucket}.parquet")


def build_run(run_dir: Path, with_index: bool) -> Path:
    """download (2 x 8 rows, 4 failed) -> score (1 undecodable) -> select -> dedup -> caption -> encode."""
    write_download_run(run_dir, shards=2, rows=8, failures_every=4)
    for shard in SHARDS:
        download = pq.read_table(run_dir / "download" / f"{shard}.parquet").to_pylist()
        uids = [r["uid"] for r in download if r["download_status"] == "success"]
        embeddings = pa.array([[0.5, 0.5]] * len(uids), pa.list_(pa.float16(), 2))
        write_stage(run_dir, "score", shard, {shard: pa.table({
            "uid": uids,
            "score_reason": ["decode_error" if u == "s000r0001" else None for u in uids],
            "score_clip": [0.1 if u == "s001r0000" else 0.3 for u in uids],
            "score_aesthetic": pa.array([None] * len(uids), pa.float32()),
            "score_nsfw": pa.array([None] * len(uids), pa.float32()),
            "score_width": [640] * len(uids), "score_height": [480] * len(uids),
            "score_caption_length": [20] * len(uids), "score_caption_words": [4] * len(uids),
            "score_image_embedding": embeddings,
        })})
    run_select(run_dir, SelectConfig(clip_min=0.2), progress=False)
    duplicate, original = "s000r0005", "s000r0000"
    dedup, caption, encode = {}, {}, {}
    for shard in SHARDS:
        selected = pq.read_table(run_dir / "select" / f"{shard}.parquet").to_pylist()
        uids = [r["uid"] for r in selected if r["select_kept"]]
        dedup[shard] = pa.table({
            "uid": uids,
            "dedup_status": ["duplicate" if u == duplicate else "kept" for u in uids],
            "dedup_reason": ["near_duplicate" if u == duplicate else None for u in uids],
            "dedup_representative": [original if u == duplicate else None for u in uids],
            "dedup_similarity": [0.97 if u == duplicate else None for u in uids],
        })
        survivors = [u for u in uids if u != duplicate]
        caption[shard] = pa.table({
            "uid": survivors,
            "caption_synthetic": ["a photo"] * len(survivors),
            "caption_reason": ["empty_caption" if u == "s001r0002" else None for u in survivors],
        })
        encoded = [u for u in survivors if u != "s001r0002"]
        encode[shard] = {shard: pa.table({"uid": encoded, "encode_bucket": ["256x256"] * len(encoded),
                                          "encode_reason": pa.array([None] * len(encoded), pa.string())}),
                         f"shards/{shard}": pa.table({"uid": encoded, "bucket": ["256x256"] * len(encoded),
                                                      "caption_original": ["x"] * len(encoded)})}
    write_stage(run_dir, "dedup", "dedup", dedup)  # dedup: one manifest for all shards
    for shard in SHARDS:
        write_stage(run_dir, "caption", shard, {shard: caption[shard]})
    for shard in SHARDS:
        manifest = ShardManifest(stage="encode", shard=shard, config_hash="test")
        with shard_outputs(run_dir / "encode", manifest, []) as outputs:
            for name, table in encode[shard].items():
                pq.write_table(table, outputs.path(f"{name}.parquet"))
            manifest.rows_in = manifest.rows_out = encode[shard][shard].num_rows
    if with_index:
        write_uid_index(run_dir)
    return run_dir


@pytest.fixture(params=["index", "scan"])
def run_dir(request, tmp_path) -> Path:
    return build_run(tmp_path, with_index=request.param == "index")


def test_funnel_counts_every_stage_and_reason(run_dir):
    counts = {c.stage: c for c in funnel(run_dir)}
    assert list(counts) == ["download", "score", "select", "dedup", "caption", "encode"]
    assert (counts["download"].rows_in, counts["download"].rows_out) == (16, 12)
    assert counts["download"].reasons == {"http_404": 4}
    assert (counts["score"].rows_in, counts["score"].rows_out) == (12, 11)
    assert (counts["select"].rows_in, counts["select"].rows_out) == (11, 10)
    assert counts["select"].reasons == {"clip_low": 1}
    assert (counts["dedup"].rows_in, counts["dedup"].rows_out) == (10, 9)
    assert counts["caption"].reasons == {"empty_caption": 1}
    assert (counts["encode"].rows_in, counts["encode"].rows_out) == (8, 8)


def test_funnel_reads_the_manifests_not_the_tables(run_dir):
    before = funnel(run_dir)
    for table in run_dir.glob("*/0*.parquet"):
        table.write_bytes(b"not parquet")  # a table read would fail now
    assert funnel(run_dir) == before


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
    kept = explain_uid(run_dir, "s001r0001")
    assert "kept by every stage" in format_story("s001r0001", kept)
    assert kept[-1].row["bucket"] == "256x256"  # encode's training index joins its row
    assert "not in this run" in format_story("nope", explain_uid(run_dir, "nope"))


def test_a_story_reads_one_shard_per_stage_and_no_embeddings(run_dir):
    for stage in ("score", "select", "dedup", "caption", "encode"):
        (run_dir / stage / "00000.parquet").write_bytes(b"not parquet")  # the other shard
    verdicts = {v.stage: v for v in explain_uid(run_dir, "s001r0001")}
    assert verdicts["score"].row["score_clip"] == pytest.approx(0.3)
    assert "score_image_embedding" not in verdicts["score"].row
    assert verdicts["select"].row["select_kept"] is True


def test_the_uid_index_answers_without_reading_the_download_tables(tmp_path):
    run_dir = build_run(tmp_path, with_index=True)
    for shard in SHARDS:
        (run_dir / "download" / f"{shard}.parquet").write_bytes(b"not parquet")
    assert find_shard(run_dir, "s000r0002") == "00000"
    assert find_shard(run_dir, "s001r0007") == "00001"
    index = run_dir / "download" / UID_INDEX_DIR
    absent = next(f"x{i}" for i in range(1000) if (index / f"{uid_bucket(f'x{i}'):02x}.parquet").exists())
    assert find_shard(run_dir, absent) is None  # its bucket file is there and does not list it


def test_without_an_index_the_scan_stops_at_the_first_hit(tmp_path):
    run_dir = build_run(tmp_path, with_index=False)
    (run_dir / "download" / "00001.parquet").write_bytes(b"not parquet")
    assert find_shard(run_dir, "s000r0002") == "00000"  # shard 00001 was never opened
    with pytest.raises(InputError, match=r"download/00001.parquet"):
        find_shard(run_dir, "s001r0007")  # a broken table on the way is an error naming it


def test_cli_prints_the_funnel_and_answers_for_uids(run_dir, capsys):
    assert inspect_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "http_404" in out and "near_duplicate" in out and "empty_caption" in out
    assert inspect_main([str(run_dir), "--uid", "s001r0002", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["reason"] for v in data["s001r0002"]][-2:] == ["empty_caption", None]
    assert inspect_main([str(run_dir), "--uid", "missing"]) == 1
