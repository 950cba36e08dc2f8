"""An ingested run goes through the score stage unchanged (tiny open_clip model)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from download_factory import tiny_clip_dir
from test_ingest import jpeg

from pipeline.cli import main as rectiflow
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip_dir(request, tmp_path_factory) -> Path:
    return tiny_clip_dir(request, tmp_path_factory)


def test_ingested_folder_is_scored(tmp_path, clip_dir):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg(f"s{i}", (96, 96)))
        (root / f"{i}.txt").write_text(f"a noisy picture number {i}")
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--folder", str(root), "--ingest.rows_per_shard=2",
                      "--ingest.decode.min_size=16"]) == 0
    config = ScoreConfig(model=f"local-dir:{clip_dir}", batch_size=2)
    manifests = run_stage(lambda: ClipScorer(config), score_shards(run / "download"),
                          run / "score", RunnerConfig())
    assert [(m.shard, m.rows_in) for m in manifests] == [("00000", 2), ("00001", 1)]
    download = pq.read_table(run / "download" / "00000.parquet").to_pylist()
    assert [r["download_reason"] for r in download] == [None, None]  # 0.jpg, 1.jpg
    scores = pq.read_table(run / "score" / "00000.parquet")
    assert scores["uid"].to_pylist() == [r["uid"] for r in download]
    assert all(s is not None for s in scores["score_clip"].to_pylist())
