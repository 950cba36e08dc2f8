"""Similarity kernels: all (query, row) pairs at cosine >= threshold, and nearest centroids.

- "faiss": exact float32 inner products (faiss flat index, BLAS blocks), as the paper did.
- "bf16": a bfloat16 matrix product (meant for CPUs with AMX; on an AVX512-BF16 EPYC the
  conversions and recheck make it 2x slower than "faiss", see docs/benchmarks.md) as a
  filter, then every candidate's cosine recomputed exactly in float32. Rounding both unit
  vectors to bfloat16 (unit roundoff u = 2^-8) moves a dot product by at most about 2u = 0.008
  (|x.y error| <= 2u sum|x_i y_i| <= 2u), so candidates are taken from `threshold - 0.02`
  down: no pair above the threshold is lost, and the reported similarity is exact.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

from dedup.pairs import Pairs

Kernel = Literal["faiss", "bf16"]
BF16_SLACK = 0.02  # > 2u + float16 storage error of the norms; see the module docstring
_BLOCK_ELEMENTS = 1 << 24  # query rows per block x database rows: 32 MB of bf16 scores


def as_float32(vectors: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of a float16 (or any) embedding array as unit-norm float32, ready for faiss."""
    x = vectors[rows]
    if x.dtype == np.float16:
        x = _half_to_float(np.ascontiguousarray(x))
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)  # float16 storage leaves norms off 1 by ~1e-3; cosines stay exact
    return x


def _half_to_float(x: np.ndarray) -> np.ndarray:
    # faiss's fp16 decoder (F16C SIMD, its own threads) is about 1.5-2x numpy's astype, and
    # dedup converts every row at least twice (assignment, search).
    decoder = faiss.ScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16)
    return decoder.decode(x.view(np.uint8))


def range_pairs(
    vectors: np.ndarray,
    queries: np.ndarray,
    database: np.ndarray,
    threshold: float,
    kernel: Kernel = "faiss",
) -> Pairs:
    """Pairs (query row, database row) with cosine >= threshold; rows index `vectors`."""
    if kernel == "bf16":
        return _range_pairs_bf16(vectors, queries, database, threshold)
    db = as_float32(vectors, database)
    q = _queries_float32(vectors, queries, database, db)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    lims, sims, ids = index.range_search(q, threshold)
    rows = np.repeat(queries, np.diff(lims).astype(np.int64))
    return Pairs.from_directed(rows, database[ids], sims)


def _queries_float32(vectors, queries, database, db) -> np.ndarray:
    """A cluster's queries are its members then outsiders: convert the members only once."""
    if queries is database:
        return db
    n = len(database)
    if len(queries) >= n and np.array_equal(queries[:n], database):
        return np.concatenate([db, as_float32(vectors, queries[n:])])
    return as_float32(vectors, queries)


def _range_pairs_bf16(vectors, queries, database, threshold) -> Pairs:
    import torch  # only this kernel needs it

    db32 = as_float32(vectors, database)
    queries32 = _queries_float32(vectors, queries, database, db32)
    db = torch.from_numpy(db32).to(torch.bfloat16)
    step = max(1, _BLOCK_ELEMENTS // max(1, len(database)))
    hits_q, hits_d = [], []
    for start in range(0, len(queries), step):
        block = queries[start : start + step]
        q = torch.from_numpy(queries32[start : start + step]).to(torch.bfloat16)
        scores = q @ db.T  # (Q, D) bf16, accumulated in float32
        qi, di = torch.nonzero(scores >= threshold - BF16_SLACK, as_tuple=True)
        hits_q.append(block[qi.numpy()])
        hits_d.append(database[di.numpy()])
    hits = np.concatenate(hits_q), np.concatenate(hits_d)
    candidates = Pairs.from_directed(*hits, np.zeros(len(hits[0]), np.float32))
    exact = _exact_cosines(vectors, candidates.i, candidates.j)
    return Pairs(candidates.i, candidates.j, exact).at_least(threshold)


def _exact_cosines(vectors: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    if len(i) == 0:
        return np.empty(0, np.float32)
    return np.einsum("ij,ij->i", as_float32(vectors, i), as_float32(vectors, j))


def nearest(
    vectors: np.ndarray, rows: np.ndarray, centroids: np.ndarray, k: int, kernel: Kernel
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest centroids of each row, best first.

    With "bf16" the similarities are off by up to ~0.01: fine for routing rows to clusters
    (a row near a border may go to either side; multiprobe's margin covers it)."""
    x = as_float32(vectors, rows)
    if kernel == "bf16":
        import torch

        c = torch.from_numpy(centroids).to(torch.bfloat16)
        scores = (torch.from_numpy(x).to(torch.bfloat16) @ c.T).float()
        sims, ids = torch.topk(scores, k, dim=1)
        return sims.numpy(), ids.numpy().astype(np.int64)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    sims, ids = index.search(x, k)
    return sims, ids
