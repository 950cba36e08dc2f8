"""Routing rows to k-means clusters for the per-cluster search of semantic dedup.

Two routers, one per mode:
- `route_sd3`, the paper's procedure: spherical k-means in the embedding space, each row
  searched only inside its nearest cluster; a pair split by a cluster border is never compared.
- `route_multiprobe`: k-means in a PCA subspace of `routing_dim` dimensions, each row searched
  in its own cluster and in each next-nearest cluster whose border lies within reach of it.

Why the multiprobe rule finds split pairs. In any space, the border between clusters A and B
lies in the hyperplane H_AB that bisects their centroids, and the signed distance to H_AB is
a linear function with gradient of norm 1. Take a duplicate pair x (in A) and y (in B), at
distance |x - y| <= r apart, r = sqrt(2 (1 - threshold)) for unit vectors at cosine >=
threshold. Since x is on A's side of H_AB and y on B's, dist(x, H_AB) + dist(y, H_AB) <= r, so
one of them lies within r/2 of H_AB, and when each row within reach r/2 of a border also
searches the cluster behind it, the pair is found. A PCA projection only shrinks distances
(|P(x - y)| <= |x - y|), so the argument holds in the routing subspace too. With
`probe_fraction = 1` and `max_probes = n_clusters` the search is exact, as brute force; real
offsets between duplicates point in few of the many directions, so a fraction of the reach
(`probe_fraction`) already finds nearly all of them (docs/benchmarks.md measures the recall).

Routing in a subspace is what makes the mode fast: k-means there gives clusters about 1.3x
out of balance rather than 2.4x (the search costs the sum of squared cluster sizes), and
assignment costs a quarter of the full space's, so twice as many clusters pay off.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from dedup.kernels import Kernel, as_float32, nearest


@dataclass
class Routing:
    """Each row's home cluster, plus (row, cluster) probes: rows that also search elsewhere."""

    home: np.ndarray  # (R,) int64, aligned with the routed rows
    extra_rows: np.ndarray  # (E,) int64 row ids
    extra_clusters: np.ndarray  # (E,) int64
    n_clusters: int


def duplicate_radius(threshold: float) -> float:
    """Largest distance between two unit vectors at cosine >= threshold."""
    return float(np.sqrt(2.0 * (1.0 - min(max(threshold, -1.0), 1.0))))


def kmeans_sample(vectors: np.ndarray, rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """k-means trains on a subsample: centroids only route rows to clusters, and training on
    all rows would cost more than the whole search."""
    size = min(len(rows), size)
    rng = np.random.default_rng(seed)
    return as_float32(vectors, np.sort(rng.choice(rows, size=size, replace=False)))


def train_kmeans(x: np.ndarray, k: int, iterations: int, spherical: bool, seed: int):
    if k == 1:
        return x.mean(axis=0, keepdims=True).astype(np.float32)
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=iterations, seed=seed, spherical=spherical,
        min_points_per_centroid=1, max_points_per_centroid=max(1, len(x) // k + 1),
    )  # fmt: skip
    kmeans.train(x)
    return kmeans.centroids


def route_sd3(
    vectors: np.ndarray, rows: np.ndarray, k: int, *, iterations: int, points_per_centroid: int,
    seed: int, kernel: Kernel, chunk_rows: int,
) -> Routing:  # fmt: skip
    """Spherical k-means in the embedding space; every row goes to its nearest centroid."""
    sample = kmeans_sample(vectors, rows, k * points_per_centroid, seed)
    centroids = train_kmeans(sample, k, iterations, spherical=True, seed=seed)
    home = np.empty(len(rows), np.int64)
    for start in tqdm(range(0, len(rows), chunk_rows), desc="assign", leave=False):
        chunk = rows[start : start + chunk_rows]
        home[start : start + len(chunk)] = nearest(vectors, chunk, centroids, 1, kernel)[1][:, 0]
    return Routing(home, np.empty(0, np.int64), np.empty(0, np.int64), len(centroids))


class Projection:
    """x -> the top principal directions of a sample (orthonormal, no whitening, so distances
    only shrink), or the identity when the space is already small."""

    def __init__(self, sample: np.ndarray, dims: int | None):
        self.pca = None
        if dims is not None and dims < sample.shape[1] and len(sample) > dims:
            self.pca = faiss.PCAMatrix(sample.shape[1], dims)
            self.pca.train(sample)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x if self.pca is None else self.pca.apply(x)


def route_multiprobe(
    vectors: np.ndarray, rows: np.ndarray, k: int, threshold: float, *, routing_dim: int | None,
    max_probes: int, probe_fraction: float, iterations: int, points_per_centroid: int,
    seed: int, chunk_rows: int,
) -> Routing:  # fmt: skip
    """k-means in a PCA subspace; each row also probes the clusters whose border is in reach."""
    sample = kmeans_sample(vectors, rows, k * points_per_centroid, seed)
    project = Projection(sample, routing_dim)
    centroids = train_kmeans(project(sample), k, iterations, spherical=False, seed=seed)
    reach = probe_fraction * duplicate_radius(threshold) / 2
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    probes = min(max_probes, len(centroids))
    home = np.empty(len(rows), np.int64)
    extra_rows, extra_clusters = [], []
    for start in tqdm(range(0, len(rows), chunk_rows), desc="assign", leave=False):
        chunk = rows[start : start + chunk_rows]
        squared, near = index.search(project(as_float32(vectors, chunk)), probes)
        home[start : start + len(chunk)] = near[:, 0]
        if probes > 1:
            row_index, probe = _borders_in_reach(centroids, squared, near, reach)
            extra_rows.append(chunk[row_index])
            extra_clusters.append(near[row_index, probe])
    if not extra_rows:
        return Routing(home, np.empty(0, np.int64), np.empty(0, np.int64), len(centroids))
    extra = np.concatenate(extra_rows), np.concatenate(extra_clusters)
    return Routing(home, *extra, len(centroids))


def _borders_in_reach(centroids, squared, near, reach):
    """(row, column of `near`) for each next-nearest cluster whose bisector with the row's
    home cluster is within `reach`: dist(x, H_AB) = (|x-b|^2 - |x-a|^2) / (2 |a-b|)."""
    gain = squared[:, 1:] - squared[:, :1]  # >= 0: how much farther the other centroid is
    # |a - b| <= |x - a| + |x - b| bounds the distance from below: most candidates fail this
    # cheap test, so the centroid gaps are computed only for the few that pass.
    roots = np.sqrt(np.maximum(squared, 0))
    maybe = gain <= 2 * reach * (roots[:, :1] + roots[:, 1:])
    row_index, column = np.nonzero(maybe)
    column = column + 1
    home, other = near[row_index, 0], near[row_index, column]
    gap = np.linalg.norm(centroids[home] - centroids[other], axis=1)
    within = gain[row_index, column - 1] <= 2 * reach * gap
    valid = other >= 0  # faiss pads with -1 when fewer centroids than probes
    keep = within & valid
    return row_index[keep], column[keep]
