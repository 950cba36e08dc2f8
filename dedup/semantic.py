"""Semantic duplicates: cosine range search inside faiss k-means clusters.

Two modes over any L2-normalised embedding (CLIP, or SSCD copy-detection descriptors):
- "sd3", the paper's procedure: k-means into N clusters, each vector searched only inside its
  own cluster, so a pair split by a cluster border is never compared;
- "multiprobe": k-means in a PCA subspace, and each vector is also searched in the few
  next-nearest clusters whose border is within reach of it. A near-duplicate pair sits close
  together, so when a border separates it, one of the two lies near that border and searches
  the other's cluster. Vectors far from any border probe nothing extra, which keeps the cost
  near sd3's (`dedup/routing.py` gives the geometry).

The work is cut into `SearchTile`s (query rows x database rows of one cluster, split to fit a
memory bound), so the same tiles run in-process here or as Ray tasks (`dedup/ray_runner.py`).
Embeddings stay float16 in memory; rows are converted to float32 per chunk or tile. The
similarity kernel (exact faiss, or a bf16 filter with exact recheck) is in `dedup/kernels.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from dedup.config import DedupConfig
from dedup.kernels import Kernel, range_pairs
from dedup.pairs import Pairs
from dedup.routing import Routing, route_multiprobe, route_sd3


@dataclass
class SearchTile:
    """Compare `queries` with `database` (row ids of one cluster); pairs at >= threshold."""

    cluster: int
    queries: np.ndarray  # (Q,) int64
    database: np.ndarray  # (D,) int64

    def nbytes(self, dim: int) -> int:
        return (len(self.queries) + len(self.database)) * dim * 4


# (vectors, tiles, threshold, kernel) -> pairs: in-process here, Ray tasks in ray_runner.
TileRunner = Callable[[np.ndarray, list[SearchTile], float, Kernel], Pairs]


def search_tile(
    vectors: np.ndarray, tile: SearchTile, threshold: float, kernel: Kernel = "faiss"
) -> Pairs:
    return range_pairs(vectors, tile.queries, tile.database, threshold, kernel)


def run_tiles_locally(
    vectors: np.ndarray, tiles: list[SearchTile], threshold: float, kernel: Kernel = "faiss"
) -> Pairs:
    tiles = tqdm(tiles, desc="cluster search")
    return Pairs.concat([search_tile(vectors, t, threshold, kernel) for t in tiles])


class SemanticDeduplicator:
    """Finds all pairs above a cosine threshold that the configured mode can see."""

    def __init__(self, config: DedupConfig):
        self.config = config
        if config.num_threads:
            faiss.omp_set_num_threads(config.num_threads)
            if config.search_kernel == "bf16":
                import torch

                torch.set_num_threads(config.num_threads)

    def n_clusters(self, n: int) -> int:
        """The configured count, else sqrt(n) (sd3) or 2 sqrt(n) (multiprobe): assignment
        costs n k and the search n^2 / k, and multiprobe's assignment in a subspace is cheap
        enough that twice the clusters pay off."""
        scale = 1 if self.config.semantic_mode == "sd3" else 2
        wanted = self.config.n_clusters or round(scale * math.sqrt(n))
        return max(1, min(wanted, n))

    def find_pairs(
        self,
        vectors: np.ndarray,
        rows: np.ndarray | None = None,
        threshold: float | None = None,
        run_tiles: TileRunner = run_tiles_locally,
    ) -> Pairs:
        """Pairs of `rows` (default: all) with cosine >= threshold (default: the config's)."""
        rows = np.arange(len(vectors)) if rows is None else np.asarray(rows, np.int64)
        threshold = self.config.semantic_threshold if threshold is None else threshold
        if len(rows) < 2:
            return Pairs.empty()
        tiles = self.plan(vectors, rows, threshold)
        return run_tiles(vectors, tiles, threshold, self.config.search_kernel)

    def plan(self, vectors: np.ndarray, rows: np.ndarray, threshold: float) -> list[SearchTile]:
        """k-means, assignment with probes, and the tiles of the per-cluster phase."""
        routing = self.route(vectors, rows, threshold)
        return plan_tiles(rows, routing, vectors.shape[1], self.config.max_task_mb << 20)

    def route(self, vectors: np.ndarray, rows: np.ndarray, threshold: float) -> Routing:
        cfg = self.config
        common = dict(
            iterations=cfg.kmeans_iterations, points_per_centroid=cfg.kmeans_points_per_centroid,
            seed=cfg.seed, chunk_rows=cfg.chunk_rows,
        )  # fmt: skip
        k = self.n_clusters(len(rows))
        if cfg.semantic_mode == "sd3":
            return route_sd3(vectors, rows, k, kernel=cfg.search_kernel, **common)
        return route_multiprobe(
            vectors, rows, k, threshold, routing_dim=cfg.routing_dim,
            max_probes=cfg.max_probes, probe_fraction=cfg.probe_fraction, **common,
        )  # fmt: skip


def plan_tiles(
    rows: np.ndarray, routing: Routing, dim: int, max_task_bytes: int
) -> list[SearchTile]:
    """One tile per cluster (its members, plus probing outsiders, against its members);
    clusters whose tile would exceed `max_task_bytes` are split into query x database blocks.

    (Searching only the upper triangle of members x members was tried: the extra calls and
    conversions cost more than the halved products at these sizes.)"""
    n_clusters = routing.n_clusters
    members = _group_by(rows, routing.home, n_clusters)
    probers = _group_by(routing.extra_rows, routing.extra_clusters, n_clusters)
    # Half the bound for each side of a block; float32 rows of `dim` values.
    block = max(1, max_task_bytes // (2 * dim * 4))
    tiles = []
    for cluster in range(n_clusters):
        database = members[cluster]
        if len(database) == 0:
            continue
        outsiders = probers[cluster]
        queries = np.concatenate([database, outsiders]) if len(outsiders) else database
        tile = SearchTile(cluster, queries, database)
        if tile.nbytes(dim) <= max_task_bytes:
            tiles.append(tile)
            continue
        for q in range(0, len(queries), block):
            for d in range(0, len(database), block):
                tiles.append(SearchTile(cluster, queries[q : q + block], database[d : d + block]))
    return tiles


def _group_by(values: np.ndarray, keys: np.ndarray, n_keys: int) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n_keys + 1))
    grouped = values[order]
    return [grouped[bounds[k] : bounds[k + 1]] for k in range(n_keys)]
