"""A score shard full of odd and hostile images: every row gets a score or a reason, and the
shard completes (a broken EXIF block used to raise out of the decode and fail the shard)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hostile_images as hostile
import pyarrow.parquet as pq
import pytest
from download_factory import FactoryRow, tiny_clip_dir, write_download_shard

from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip_dir(request, tmp_path_factory) -> Path:
    return tiny_clip_dir(request, tmp_path_factory)


def test_hostile_shard_gets_a_reason_per_row_instead_of_failing(tmp_path, clip_dir):
    rows = [FactoryRow(name, "three stripes", "success", None, case.data, case.ext)
            for name, case in sorted(hostile.CASES.items())]
    write_download_shard(tmp_path / "download", "00000", rows)
    config = ScoreConfig(model=f"local-dir:{clip_dir}", batch_size=4, decode_threads=2)
    (manifest,) = run_stage(lambda: ClipScorer(config), score_shards(tmp_path / "download"),
                            tmp_path / "score", RunnerConfig())

    scores = {r["uid"]: r for r in pq.read_table(tmp_path / "score" / "00000.parquet").to_pylist()}
    assert {uid: row["score_reason"] for uid, row in scores.items()} == {
        name: case.reason for name, case in hostile.CASES.items()}
    expected = Counter(c.reason for c in hostile.CASES.values() if c.reason is not None)
    assert manifest.rows_in == len(rows) and manifest.reasons == dict(expected)
    for name in ("broken_exif_png", "broken_exif_rotated_jpeg"):
        row = scores[name]
        assert -1.0 <= row["score_clip"] <= 1.0 and row["score_image_embedding"] is not None
        assert (row["score_width"], row["score_height"]) == hostile.SIZE  # upright
    assert scores["pixel_bomb_png"]["score_clip"] is None
