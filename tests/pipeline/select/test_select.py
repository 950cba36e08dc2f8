"""`rectiflow select`: rules, presets, per-rule counts; nothing deleted, reruns are no-ops."""

from __future__ import annotations

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


def write_scores(run_dir: Path, shard: str, rows: list[tuple]) -> None:
    """Score and download tables for `rows` of (uid, clip, aesthetic, nsfw, w, h, caption, reason)."""
    data = {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}
    captions = data.pop("caption")
    data["score_caption_length"] = [len(c) for c in captions]
    data["score_caption_words"] = [len(c.split()) for c in captions]
    for stage, table in (
        ("score", pa.table(data)),
        ("download", pa.table({"uid": data["uid"], "caption": captions})),
    ):
        manifest = ShardManifest(stage=stage, shard=shard, config_hash="test")
        with shard_outputs(run_dir / stage, manifest, []) as outputs:
            pq.write_table(table, outputs.path(f"{shard}.parquet"))


def kept(run_dir: Path) -> dict[str, str | None]:
    table = pq.read_table(run_dir / "select" / "kept.parquet").to_pylist()
    return {r["uid"]: r["select_reason"] for r in table}


GOOD = "a red bicycle leaning on a brick wall"


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
    manifest = run_select(tmp_path, config)

    assert kept(tmp_path) == {
        "ok": None, "nsfw": "nsfw", "ugly": "aesthetic_low", "ugly_and_nsfw": "nsfw",
        "off_topic": "clip_low",
    }  # the undecodable row was dropped by score, so select never sees it
    assert (manifest.rows_in, manifest.rows_out) == (5, 1)
    assert manifest.reasons == {"nsfw": 2, "aesthetic_low": 1, "clip_low": 1}
    rules = {r["rule"]: r for r in pq.read_table(tmp_path / "select" / "rules.parquet").to_pylist()}
    assert rules["aesthetic_low"]["removed"] == 1 and rules["aesthetic_low"]["failed"] == 2
    assert rules["nsfw"]["threshold"] == "score_nsfw < 0.5"
    detail = pq.read_table(tmp_path / "select" / "kept.parquet").to_pylist()[1]["select_detail"]
    assert detail == "score_nsfw=0.9 >= 0.5"
    # Nothing is deleted: the scores are still all there.
    assert pq.read_table(tmp_path / "score" / "00001.parquet").num_rows == 2


def test_clip_top_percent_keeps_the_best_share_of_the_pool(tmp_path):
    rows = [(f"u{i}", i / 10, None, None, 640, 480, GOOD, None) for i in range(10)]
    write_scores(tmp_path, "00000", rows[:5])
    write_scores(tmp_path, "00001", rows[5:])
    manifest = run_select(tmp_path, SelectConfig(preset="datacomp_clip_top30"))
    assert {u for u, reason in kept(tmp_path).items() if reason is None} == {"u7", "u8", "u9"}
    assert manifest.reasons == {"clip_not_top_percent": 7}


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
    write_scores(tmp_path, "00000", [("a", 0.3, None, None, 64, 64, GOOD, None)])
    run_select(tmp_path, SelectConfig(clip_min=0.2))
    kept_file = tmp_path / "select" / "kept.parquet"
    before = kept_file.stat().st_mtime_ns
    run_select(tmp_path, SelectConfig(clip_min=0.2))
    assert kept_file.stat().st_mtime_ns == before
    run_select(tmp_path, SelectConfig(clip_min=0.5))
    assert kept(tmp_path) == {"a": "clip_low"}


def test_rule_on_a_score_that_was_never_computed_fails_loudly(tmp_path):
    write_scores(tmp_path, "00000", [("a", 0.3, None, None, 64, 64, GOOD, None)])
    run_select(tmp_path, SelectConfig(clip_min=0.5))
    before = (tmp_path / "select" / "kept.parquet").read_bytes()
    with pytest.raises(SelectError, match="score_aesthetic"):
        run_select(tmp_path, SelectConfig(aesthetic_min=5.0))
    # The previous decision and its manifest are left as they were.
    assert (tmp_path / "select" / "kept.parquet").read_bytes() == before
    assert (tmp_path / "select" / "all.manifest.json").exists()


def test_cli_runs_a_preset_and_rejects_unknown_keys(tmp_path, capsys):
    write_scores(tmp_path, "00000", [("a", 0.3, 6.0, 0.1, 640, 480, GOOD, None),
                                     ("b", 0.3, 6.0, 0.7, 640, 480, GOOD, None)])
    assert select_main([str(tmp_path), "--select.nsfw_max=0.5"]) == 0
    out = capsys.readouterr().out
    assert "kept 1 of 2" in out and "nsfw" in out
    assert (tmp_path / "select" / "config.resolved.toml").exists()
    assert select_main([str(tmp_path), "--select.nsfw_maximum=0.5"]) == 2
    assert "nsfw_max" in capsys.readouterr().err
