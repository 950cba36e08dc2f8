"""`rectiflow select`: rules, presets, per-rule counts, one decision table per score shard;
nothing deleted, reruns redo only the shards whose inputs (or the cut) changed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.manifest import ShardManifest, shard_outputs
from pipeline.select.cli import main as select_main
from pipeline.select.stage import SelectConfig, SelectError, run_select

pytestmark = pytest.mark.timeout(60)

COLUMNS = ("uid", "score_clip", "score_aesthetic", "score_nsfw", "score_width", "score_height",
           "caption", "score_reason")
GOOD = "a red bicycle leaning on a brick wall"


def write_scores(run_dir: Path, shard: str, rows: list[tuple], download: bool = True) -> None:
    """Score and download tables for `rows` of (uid, clip, aesthetic, nsfw, w, h, caption, reason)."""
    data = {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}
    captions = data.pop("caption")
    data["score_caption_length"] = [len(c) for c in captions]
    data["score_caption_words"] = [len(c.split()) for c in captions]
    data["score_clip"] = pa.array(data["score_clip"], pa.float32())
    tables = [("score", pa.table(data))]
    if download:
        tables.append(("download", pa.table({"uid": data["uid"], "caption": captions})))
    for stage, table in tables:
        manifest = ShardManifest(stage=stage, shard=shard, config_hash="test")
        with shard_outputs(run_dir / stage, manifest, []) as outputs:
            pq.write_table(table, outputs.path(f"{shard}.parquet"))


def select_tables(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "select").glob("0*.parquet"))


def kept(run_dir: Path) -> dict[str, str | None]:
    rows = [r for path in select_tables(run_dir) for r in pq.read_table(path).to_pylist()]
    return {r["uid"]: r["select_reason"] for r in rows}


def mtimes(run_dir: Path) -> dict[str, int]:
    """Modification times of select's per-shard files (tables, manifests, sketches)."""
    select = run_dir / "select"
    return {str(p.relative_to(select)): p.stat().st_mtime_ns for p in sorted(select.rglob("0*"))}


def row(uid: str, clip: float, nsfw: float | None = None) -> tuple:
    return (uid, clip, None, nsfw, 640, 480, GOOD, None)


def test_thresholds_attribute_each_drop_to_the_first_failing_rule(tmp_path):
    write_scores(tmp_path, "00000", [
        ("ok", 0.30, 6.0, 0.01, 640, 480, GOOD, None),
        ("nsfw", 0.30, 6.0, 0.90, 640, 480, GOOD, None),
        ("ugly", 0.30, 3.0, 0.01, 640, 480, GOOD, None),
        ("ugly_and_nsfw", 0.30, 3.0, 0.95, 640, 480, GOOD, None),
    ])
    write_scores(tmp_path, "00001", [
        ("off_topic", 0.10, 6.0, 0.01, 640, 480, GOOD, None),
        ("undecodable", None, None, None, None, None, GOOD, "decode_error"),
    ])
    config = SelectConfig(nsfw_max=0.5, aesthetic_min=5.0, clip_min=0.2)
    result = run_select(tmp_path, config)

    # One decision table per score shard, each with its own manifest.
    assert [p.name for p in select_tables(tmp_path)] == ["00000.parquet", "00001.parquet"]
    assert kept(tmp_path) == {
        "ok": None, "nsfw": "nsfw", "ugly": "aesthetic_low", "ugly_and_nsfw": "nsfw",
        "off_topic": "clip_low",
    }  # the undecodable row was dropped by score, so select never sees it
    assert (result.rows_in, result.rows_out) == (5, 1)
    assert result.reasons == {"nsfw": 2, "aesthetic_low": 1, "clip_low": 1}
    second = ShardManifest.read(tmp_path / "select" / "00001.manifest.json")
    assert (second.rows_in, second.rows_out, second.reasons) == (1, 0, {"clip_low": 1})
    rules = {r["rule"]: r for r in pq.read_table(tmp_path / "select" / "rules.parquet").to_pylist()}
    assert rules["aesthetic_low"]["removed"] == 1 and rules["aesthetic_low"]["failed"] == 2
    assert rules["clip_low"]["removed"] == 1 and rules["clip_low"]["failed"] == 1
    assert rules["nsfw"]["threshold"] == "score_nsfw < 0.5"
    detail = pq.read_table(tmp_path / "select" / "00000.parquet").to_pylist()[1]["select_detail"]
    assert detail == "score_nsfw=0.9 >= 0.5"
    # Nothing is deleted: the scores are still all there.
    assert pq.read_table(tmp_path / "score" / "00001.parquet").num_rows == 2


def test_rules_table_is_the_sum_of_the_shard_manifests(tmp_path):
    for shard in range(3):
        write_scores(tmp_path, f"{shard:05d}", [row(f"s{shard}u{i}", i / 10, nsfw=(i % 3) / 2)
                                                for i in range(shard + 3)])
    run_select(tmp_path, SelectConfig(nsfw_max=0.5, clip_min=0.15))
    manifests = [ShardManifest.read(p) for p in sorted((tmp_path / "select").glob("0*.manifest.json"))]
    rules = pq.read_table(tmp_path / "select" / "rules.parquet").to_pylist()
    for i, rule in enumerate(rules):
        assert rule["removed"] == sum(m.extra["rules"][i]["removed"] for m in manifests)
        assert rule["failed"] == sum(m.extra["rules"][i]["failed"] for m in manifests)
    # ... and the manifests agree with the tables they describe.
    reasons = [r for p in select_tables(tmp_path) for r in pq.read_table(p)["select_reason"].to_pylist()]
    assert {r["rule"]: r["removed"] for r in rules} == {n: reasons.count(n) for n in ("nsfw", "clip_low")}


def test_clip_top_percent_keeps_the_best_share_of_the_pool(tmp_path):
    rows = [row(f"u{i}", i / 10) for i in range(10)]
    write_scores(tmp_path, "00000", rows[:5])
    write_scores(tmp_path, "00001", rows[5:])
    result = run_select(tmp_path, SelectConfig(preset="datacomp_clip_top30"))
    assert {u for u, reason in kept(tmp_path).items() if reason is None} == {"u7", "u8", "u9"}
    assert result.reasons == {"clip_not_top_percent": 7}
    assert (result.cut.pool, result.cut.target, result.cut.kept) == (10, 3, 3)
    (rule,) = pq.read_table(tmp_path / "select" / "rules.parquet").to_pylist()
    assert "kept 3 of 10 scored rows" in rule["note"] and "65536-bin histogram" in rule["note"]
    details = pq.read_table(tmp_path / "select" / "00000.parquet")["select_detail"].to_pylist()
    assert details[0].startswith("score_clip=0 < 0.69") and "histogram bin edge" in details[0]


def test_datacomp_basic_filters_size_aspect_and_captions(tmp_path):
    write_scores(tmp_path, "00000", [
        ("good", 0.3, None, None, 640, 480, GOOD, None),
        ("small", 0.3, None, None, 150, 400, GOOD, None),
        ("panorama", 0.3, None, None, 1600, 400, GOOD, None),
        ("one_word", 0.3, None, None, 640, 480, "horse", None),
        ("german", 0.3, None, None, 640, 480, "ein schöner Hund im grünen Garten", None),
        ("chinese", 0.3, None, None, 640, 480, "一只 猫 坐在 沙发上 cat", None),
    ])
    run_select(tmp_path, SelectConfig(preset="datacomp_basic"))
    assert kept(tmp_path) == {
        "good": None, "small": "image_too_small", "panorama": "aspect_too_extreme",
        "one_word": "caption_too_short",
        "german": None,  # the ASCII heuristic cannot tell Latin-script languages apart
        "chinese": "caption_not_english",
    }


def test_rerun_is_a_no_op_and_a_new_rule_redoes_it(tmp_path):
    write_scores(tmp_path, "00000", [row("a", 0.3)])
    run_select(tmp_path, SelectConfig(clip_min=0.2))
    before = mtimes(tmp_path)
    assert run_select(tmp_path, SelectConfig(clip_min=0.2)).redone == []
    assert mtimes(tmp_path) == before
    assert run_select(tmp_path, SelectConfig(clip_min=0.5)).redone == ["00000"]
    assert kept(tmp_path) == {"a": "clip_low"}


def test_a_changed_score_shard_redoes_only_its_select_shard(tmp_path):
    for shard in range(3):
        write_scores(tmp_path, f"{shard:05d}", [row(f"s{shard}u{i}", 0.1 * i) for i in range(4)])
    config = SelectConfig(clip_min=0.15)
    assert run_select(tmp_path, config).redone == ["00000", "00001", "00002"]
    before = mtimes(tmp_path)
    write_scores(tmp_path, "00001", [row("s1u0", 0.9), row("s1u1", 0.0)])
    result = run_select(tmp_path, config)
    assert result.redone == ["00001"]
    after = mtimes(tmp_path)
    assert {k for k in before if before[k] != after[k]} == {"00001.parquet", "00001.manifest.json"}
    assert kept(tmp_path)["s1u0"] is None and "s1u3" not in kept(tmp_path)
    assert (result.rows_in, result.rows_out) == (10, 5)


def test_clip_top_percent_redoes_the_others_only_when_the_cut_moves(tmp_path):
    for shard in range(3):
        write_scores(tmp_path, f"{shard:05d}",
                     [row(f"s{shard}u{i}", 0.5 + 0.01 * (4 * shard + i)) for i in range(4)])
    config = SelectConfig(clip_top_percent=50.0)  # the best 6 of 12: shard 2 and half of 1
    first = run_select(tmp_path, config)
    assert first.cut.kept == 6 and first.reasons == {"clip_not_top_percent": 6}
    before = mtimes(tmp_path)

    # Shard 0 changes below the cut (one row 0.50 -> 0.51): the cut stays, shard 0 alone is redone,
    # and only its own sketch is recounted.
    write_scores(tmp_path, "00000", [row(f"s0u{i}", 0.5 + 0.01 * max(i, 1)) for i in range(4)])
    second = run_select(tmp_path, config)
    assert second.redone == ["00000"] and second.cut.value == first.cut.value
    after = mtimes(tmp_path)
    assert {k for k in before if before[k] != after[k]} == {
        "00000.parquet", "00000.manifest.json", "_sketch/00000.json"}

    # Shard 0 now holds the best rows of the pool: the cut moves and every shard is redone.
    write_scores(tmp_path, "00000", [row(f"s0u{i}", 0.9) for i in range(4)])
    third = run_select(tmp_path, config)
    assert third.redone == ["00000", "00001", "00002"] and third.cut.value > first.cut.value
    winners = {u for u, reason in kept(tmp_path).items() if reason is None}
    assert winners == {"s0u0", "s0u1", "s0u2", "s0u3", "s2u2", "s2u3"}


def test_a_damaged_sketch_cache_is_recounted(tmp_path):
    write_scores(tmp_path, "00000", [row(f"u{i}", i / 10) for i in range(10)])
    run_select(tmp_path, SelectConfig(clip_top_percent=20.0))
    cache = tmp_path / "select" / "_sketch" / "00000.json"
    assert json.loads(cache.read_text())["bins"] == 65536
    pool = tmp_path / "select" / "_sketch" / "_pool.json"
    assert json.loads(pool.read_text())["count"] == json.loads(cache.read_text())["count"]
    for damaged in (cache, pool):  # the shard's sketch and the merged one
        damaged.write_text('{"bins": 65536, "source_sha256": "')
    (tmp_path / "select" / "00000.manifest.json").unlink()
    result = run_select(tmp_path, SelectConfig(clip_top_percent=20.0))
    assert result.cut.kept == 2 and json.loads(cache.read_text())["count"]
    assert json.loads(pool.read_text())["count"] == json.loads(cache.read_text())["count"]


def test_the_merged_sketch_follows_a_changed_score_shard(tmp_path):
    write_scores(tmp_path, "00000", [row(f"u{i}", i / 10) for i in range(10)])
    write_scores(tmp_path, "00001", [row(f"v{i}", i / 10) for i in range(10)])
    assert run_select(tmp_path, SelectConfig(clip_top_percent=10.0)).cut.kept == 2
    write_scores(tmp_path, "00001", [row(f"v{i}", 0.95) for i in range(10)])  # all above u's
    result = run_select(tmp_path, SelectConfig(clip_top_percent=50.0))
    assert result.cut.kept == 10 and result.cut.value > 0.9


def test_the_old_run_wide_table_is_replaced_by_shard_tables(tmp_path):
    write_scores(tmp_path, "00000", [row("a", 0.3)])
    old = ShardManifest(stage="select", shard="all", config_hash="old")
    with shard_outputs(tmp_path / "select", old, []) as outputs:
        pq.write_table(pa.table({"uid": ["a"]}), outputs.path("kept.parquet"))
    run_select(tmp_path, SelectConfig(clip_min=0.2))
    names = sorted(p.name for p in (tmp_path / "select").iterdir() if p.is_file())
    assert names == ["00000.manifest.json", "00000.parquet", "rules.parquet"]


def test_rule_on_a_score_that_was_never_computed_fails_loudly(tmp_path):
    write_scores(tmp_path, "00000", [row("a", 0.3)])
    run_select(tmp_path, SelectConfig(clip_min=0.5))
    before = (tmp_path / "select" / "00000.parquet").read_bytes()
    with pytest.raises(SelectError, match=r"score_aesthetic.*score/00000.parquet"):
        run_select(tmp_path, SelectConfig(aesthetic_min=5.0))
    # The previous decision and its manifest are left as they were.
    assert (tmp_path / "select" / "00000.parquet").read_bytes() == before
    assert (tmp_path / "select" / "00000.manifest.json").exists()


def test_bad_inputs_are_errors_naming_the_file(tmp_path):
    write_scores(tmp_path, "00000", [row("a", 0.3)], download=False)
    with pytest.raises(SelectError, match=r"download/00000.parquet"):
        run_select(tmp_path, SelectConfig(english_like=True))
    manifest = ShardManifest(stage="score", shard="00001", config_hash="test")
    with shard_outputs(tmp_path / "score", manifest, []) as outputs:
        pq.write_table(pa.table({"uid": ["b"], "score_reason": pa.array([None], pa.string())}),
                       outputs.path("00001.parquet"))
    with pytest.raises(SelectError, match=r"score/00001.parquet has no column.*score_clip"):
        run_select(tmp_path, SelectConfig(clip_min=0.2))
    assert not (tmp_path / "select" / "00001.manifest.json").exists()


def test_cli_runs_a_preset_and_rejects_unknown_keys(tmp_path, capsys):
    write_scores(tmp_path, "00000", [("a", 0.3, 6.0, 0.1, 640, 480, GOOD, None),
                                     ("b", 0.3, 6.0, 0.7, 640, 480, GOOD, None)])
    assert select_main([str(tmp_path), "--select.nsfw_max=0.5"]) == 0
    out = capsys.readouterr().out
    assert "kept 1 of 2" in out and "(1 shards, 1 redone)" in out and "nsfw" in out
    assert (tmp_path / "select" / "config.resolved.toml").exists()
    assert select_main([str(tmp_path), "--select.nsfw_maximum=0.5"]) == 2
    assert "nsfw_max" in capsys.readouterr().err


def test_with_captions_a_score_change_still_redoes_the_shard(tmp_path):
    # score/00000.parquet and download/00000.parquet share a file name; the fingerprint keys
    # their recorded checksums by stage, so a change to either one is seen.
    write_scores(tmp_path, "00000", [row("a", 0.3)])
    config = SelectConfig(english_like=True, clip_min=0.2)
    run_select(tmp_path, config)
    table = pq.read_table(tmp_path / "score" / "00000.parquet")
    table = table.set_column(table.schema.get_field_index("score_clip"), "score_clip",
                             pa.array([0.1], pa.float32()))
    manifest = ShardManifest(stage="score", shard="00000", config_hash="test")
    with shard_outputs(tmp_path / "score", manifest, []) as outputs:
        pq.write_table(table, outputs.path("00000.parquet"))
    assert run_select(tmp_path, config).redone == ["00000"]
    assert kept(tmp_path) == {"a": "clip_low"}


def test_done_shards_are_checked_by_size_and_with_verify_by_checksum(tmp_path):
    write_scores(tmp_path, "00000", [row("a", 0.3), row("b", 0.1)])
    config = SelectConfig(clip_min=0.2)
    run_select(tmp_path, config)
    table = tmp_path / "select" / "00000.parquet"
    data = bytearray(table.read_bytes())
    data[-9] ^= 1  # same size, other bytes
    table.write_bytes(bytes(data))
    assert run_select(tmp_path, config).redone == []
    assert run_select(tmp_path, config, verify=True).redone == ["00000"]
    assert kept(tmp_path) == {"a": None, "b": "clip_low"}
