"""The per-cluster phase of semantic dedup as Ray tasks.

The float16 embeddings go into the object store once; each task reads the rows of its tiles
from it (zero-copy on the node) and converts only those to float32. Tiles were already split
so that none exceeds `max_task_mb`; small tiles are batched into one task so the per-task
overhead (~ms) does not dominate, and every task declares its memory to the scheduler.
"""

from __future__ import annotations

import functools

import numpy as np
import ray
from tqdm import tqdm

from dedup.kernels import Kernel
from dedup.pairs import Pairs
from dedup.semantic import SearchTile, TileRunner, search_tile

# Comparisons (query rows x database rows) per task: about 0.1-0.5 s of one core at 512-d.
_COMPARISONS_PER_TASK = 1 << 23


def batch_tiles(tiles: list[SearchTile], comparisons: int = _COMPARISONS_PER_TASK):
    """Consecutive tiles grouped until a batch holds about `comparisons` query x row pairs."""
    batches, current, work = [], [], 0
    for tile in tiles:
        current.append(tile)
        work += len(tile.queries) * len(tile.database)
        if work >= comparisons:
            batches.append(current)
            current, work = [], 0
    if current:
        batches.append(current)
    return batches


@ray.remote(num_cpus=1)
def _search_batch(vectors: np.ndarray, tiles: list[SearchTile], threshold: float, kernel) -> Pairs:
    # Tiles run one after another, so the task's peak memory is that of its largest tile.
    return Pairs.concat([search_tile(vectors, tile, threshold, kernel) for tile in tiles])


def run_tiles_on_ray(
    vectors: np.ndarray,
    tiles: list[SearchTile],
    threshold: float,
    kernel: Kernel = "faiss",
    max_task_mb: int = 256,
) -> Pairs:
    """Search all tiles as Ray tasks (ray.init must have been called) and merge their pairs."""
    if not tiles:
        return Pairs.empty()
    dim = vectors.shape[1]
    vectors_ref = ray.put(np.ascontiguousarray(vectors))
    pending = []
    for batch in batch_tiles(tiles):
        largest = max(tile.nbytes(dim) for tile in batch)
        # Declared memory: the tile's float32 rows plus faiss's block of scores and results.
        memory = min(largest, max_task_mb << 20) + (64 << 20)
        pending.append(
            _search_batch.options(memory=memory).remote(vectors_ref, batch, threshold, kernel)
        )
    parts = []
    with tqdm(total=len(pending), desc="cluster search (ray)") as progress:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            parts.extend(ray.get(done))
            progress.update(len(done))
    return Pairs.concat(parts)


def ray_tile_runner(max_task_mb: int) -> TileRunner:
    return functools.partial(run_tiles_on_ray, max_task_mb=max_task_mb)
