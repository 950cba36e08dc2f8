"""Select on upstream columns: `column_min`/`column_max` over a list's passthrough columns
(read from download/k.parquet), the LAION-Aesthetics presets, errors for absent columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import load_config
from pipeline.core.manifest import ShardManifest, shard_outputs
from pipeline.inspect.funnel import format_funnel, funnel
from pipeline.select.cli import main as select_main
from pipeline.select.stage import SelectConfig, SelectError, run_select

pytestmark = pytest.mark.timeout(60)


def write_shard(run_dir: Path, shard: str, rows: list[dict]) -> None:
    """A score shard (every row scored) and its download shard with LAION columns."""
    uids = [r["uid"] for r in rows]
    n = len(rows)
    score = pa.table({
        "uid": uids, "score_reason": pa.array([None] * n, pa.string()),
        "score_clip": pa.array([0.3] * n, pa.float32()), "score_aesthetic": [None] * n,
        "score_nsfw": [None] * n, "score_width": [640] * n, "score_height": [480] * n,
        "score_caption_length": [20] * n, "score_caption_words": [4] * n})
    download = {"uid": uids, "caption": ["a cat on a mat"] * n,
                "download_status": ["success"] * n}
    for name in ("AESTHETIC_SCORE", "punsafe", "pwatermark"):
        download[name] = pa.array([r.get(name) for r in rows], pa.float64())
    for stage, table in (("score", score), ("download", pa.table(download))):
        manifest = ShardManifest(stage=stage, shard=shard, config_hash="test")
        with shard_outputs(run_dir / stage, manifest, []) as outputs:
            pq.write_table(table, outputs.path(f"{shard}.parquet"))


def laion_row(uid, aesthetic, punsafe=0.1, pwatermark=0.1):
    return {"uid": uid, "AESTHETIC_SCORE": aesthetic, "punsafe": punsafe, "pwatermark": pwatermark}


def decisions(run_dir: Path) -> dict[str, tuple]:
    rows = [r for p in sorted((run_dir / "select").glob("0*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    return {r["uid"]: (r["select_reason"], r["select_detail"]) for r in rows}


def test_column_min_and_max_over_shards_with_rules_and_funnel_counts(tmp_path):
    write_shard(tmp_path, "00000", [laion_row("a", 6.0), laion_row("b", 4.0),
                                    laion_row("c", 7.0, punsafe=0.9)])
    write_shard(tmp_path, "00001", [laion_row("d", None), laion_row("e", 5.0, pwatermark=0.95),
                                    laion_row("f", 5.5, punsafe=0.5)])
    config = SelectConfig(column_min={"AESTHETIC_SCORE": 5.0}, column_max={"punsafe": 0.5})
    run = run_select(tmp_path, config, progress=False)
    got = decisions(tmp_path)
    assert {u: r for u, (r, _) in got.items()} == {
        "a": None, "b": "AESTHETIC_SCORE_too_low", "c": "punsafe_too_high",
        "d": "AESTHETIC_SCORE_too_low",  # a null upstream value fails the rule
        "e": None,  # no rule on pwatermark here
        "f": "punsafe_too_high"}  # column_max keeps value < max: 0.5 is out
    assert got["b"][1] == "download.AESTHETIC_SCORE=4 < 5"
    assert got["c"][1] == "download.punsafe=0.9 >= 0.5"
    rules = pq.read_table(tmp_path / "select" / "rules.parquet").to_pylist()
    assert [(r["rule"], r["threshold"], r["removed"], r["failed"]) for r in rules] == [
        ("AESTHETIC_SCORE_too_low", "download.AESTHETIC_SCORE >= 5", 2, 2),
        ("punsafe_too_high", "download.punsafe < 0.5", 2, 2)]
    assert run.reasons == {"AESTHETIC_SCORE_too_low": 2, "punsafe_too_high": 2}
    assert (run.rows_in, run.rows_out) == (6, 2)
    text = format_funnel(funnel(tmp_path))
    assert "AESTHETIC_SCORE_too_low" in text and "punsafe_too_high" in text

    # the download table is an input: a changed one redoes its shard only
    assert run_select(tmp_path, config, progress=False).redone == []
    write_shard(tmp_path, "00001", [laion_row("d", 9.0), laion_row("e", 5.0),
                                    laion_row("f", 5.5)])
    again = run_select(tmp_path, config, progress=False)
    assert again.redone == ["00001"]
    assert decisions(tmp_path)["d"] == (None, None)


def test_laion_aesthetics_presets(tmp_path):
    write_shard(tmp_path, "00000", [laion_row("keep", 6.0), laion_row("low", 4.9),
                                    laion_row("mark", 6.0, pwatermark=0.8),
                                    laion_row("unsafe", 6.0, punsafe=0.7),
                                    laion_row("high", 6.7)])
    run_select(tmp_path, SelectConfig(preset="laion_aesthetics"), progress=False)
    assert {u: r for u, (r, _) in decisions(tmp_path).items()} == {
        "keep": None, "low": "AESTHETIC_SCORE_too_low", "mark": "pwatermark_too_high",
        "unsafe": "punsafe_too_high", "high": None}
    run_select(tmp_path, SelectConfig(preset="laion_aesthetics_6_5"), progress=False)
    kept = {u for u, (r, _) in decisions(tmp_path).items() if r is None}
    assert kept == {"high"}
    # a user's value for one column overrides the preset's for that column only
    resolved = SelectConfig(preset="laion_aesthetics", column_max={"punsafe": 0.9}).resolved()
    assert resolved.column_max == {"pwatermark": 0.8, "punsafe": 0.9}
    assert resolved.column_min == {"AESTHETIC_SCORE": 5.0}


def test_a_rule_on_a_column_no_shard_has_is_an_error_naming_it(tmp_path):
    write_shard(tmp_path, "00000", [laion_row("a", 6.0)])
    with pytest.raises(SelectError, match=r"column 'watermark_score'.*00000.parquet has no such "
                       r"column; its numeric columns: \['AESTHETIC_SCORE', 'punsafe', 'pwatermark'\]"):
        run_select(tmp_path, SelectConfig(column_max={"watermark_score": 0.5}), progress=False)
    with pytest.raises(SelectError, match=r"column 'caption'.* is not numeric"):
        run_select(tmp_path, SelectConfig(column_min={"caption": 1}), progress=False)
    assert not list((tmp_path / "select").glob("0*.parquet"))  # nothing written


def test_column_rules_from_overrides_toml_and_the_cli(tmp_path, capsys):
    from pipeline.select.cli import COMMAND

    sections = load_config(COMMAND.schema, None, ["--select.column_min.AESTHETIC_SCORE=5",
                                                  "--select.column_max.punsafe=0.5"])
    assert sections["select"].column_min == {"AESTHETIC_SCORE": 5.0}
    assert sections["select"].column_max == {"punsafe": 0.5}
    toml = tmp_path / "select.toml"
    toml.write_text("[select]\npreset = 'laion_aesthetics'\n[select.column_min]\n"
                    "AESTHETIC_SCORE = 6\n")
    resolved = load_config(COMMAND.schema, toml)["select"].resolved()
    assert resolved.column_min == {"AESTHETIC_SCORE": 6.0}
    write_shard(tmp_path / "run", "00000", [laion_row("a", 6.0), laion_row("b", 1.0)])
    assert select_main([str(tmp_path / "run"), "--select.column_min.AESTHETIC_SCORE=5"]) == 0
    assert decisions(tmp_path / "run")["b"][0] == "AESTHETIC_SCORE_too_low"
    assert select_main([str(tmp_path / "run"), "--select.column_min.AESTHETIC_SCORE=x"]) != 0
    assert "AESTHETIC_SCORE" in capsys.readouterr().err
