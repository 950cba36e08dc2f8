"""The per-cluster phase on a real local Ray: same pairs as in-process, memory-bounded tasks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_dedup_algorithms import border_data
from test_dedup_stage import photo_config, photo_rows, write_score_tables

from dedup.config import DedupConfig
from dedup.semantic import SemanticDeduplicator, plan_tiles, run_tiles_locally
from dedup.stage import run_dedup

ray = pytest.importorskip("ray")
from dedup.ray_runner import batch_tiles, ray_tile_runner, run_tiles_on_ray  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.ray]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def split_tiles(vectors: np.ndarray, bound: int):
    finder = SemanticDeduplicator(DedupConfig(n_clusters=2, probe_fraction=0.5))
    rows = np.arange(len(vectors))
    return plan_tiles(rows, finder.route(vectors, rows, 0.95), vectors.shape[1], bound)


def test_ray_tasks_find_the_same_pairs_as_in_process(local_ray):
    vectors, planted = border_data(per_blob=400)
    tiles = split_tiles(vectors, bound=40_000)  # oversized clusters split into blocks
    assert len(tiles) > 2 and all(t.nbytes(vectors.shape[1]) <= 40_000 for t in tiles)
    assert len(batch_tiles(tiles, comparisons=20_000)) > 1  # several tasks, not one
    on_ray = run_tiles_on_ray(vectors, tiles, 0.95)
    local = run_tiles_locally(vectors, tiles, 0.95)
    assert on_ray.as_set() == local.as_set() and planted <= on_ray.as_set()
    finder = SemanticDeduplicator(DedupConfig(n_clusters=2, probe_fraction=0.5))
    via_finder = finder.find_pairs(vectors, run_tiles=ray_tile_runner(max_task_mb=1))
    assert via_finder.as_set() == local.as_set()


def test_stage_on_ray_backend_matches_local(local_ray, tmp_path):
    write_score_tables(tmp_path / "score", photo_rows()[:20])
    run_dedup(photo_config(backend="ray"), tmp_path / "score", tmp_path / "ray")
    run_dedup(photo_config(), tmp_path / "score", tmp_path / "local")
    for name in ("00000.parquet", "00001.parquet"):
        on_ray, local = (pq.read_table(tmp_path / d / name) for d in ("ray", "local"))
        assert on_ray.num_rows and on_ray.equals(local), name
    dropped = pa.compute.equal(pq.read_table(tmp_path / "ray" / "00000.parquet")["dedup_status"],
                               "dropped")  # fmt: skip
    assert pa.compute.sum(dropped).as_py() > 0
