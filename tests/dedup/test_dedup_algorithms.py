"""Dedup algorithms on arrays: pairs, representatives, exact labels, semantic modes, sweep."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dedup.config import DedupConfig
from dedup.exact import exact_labels, sha256_hex
from dedup.kernels import range_pairs
from dedup.pairs import Pairs
from dedup.representatives import (
    Decisions,
    group_roots,
    priority_rank,
    resolve_labels,
    resolve_pairs,
)
from dedup.semantic import SemanticDeduplicator, plan_tiles, run_tiles_locally
from dedup.sweep import sweep, write_sweep

pytestmark = pytest.mark.timeout(60)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    x = vectors.astype(np.float32)
    faiss.normalize_L2(x)
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def border_data(seed: int = 0, per_blob: int = 300, pairs: int = 40, dim: int = 32):
    """Two blobs plus planted pairs sitting on the border between them, one on each side."""
    rng = np.random.default_rng(seed)
    e1, e2 = np.eye(dim, dtype=np.float32)[:2]
    blob1 = unit(e1 + 0.9 * rng.standard_normal((per_blob, dim)) / np.sqrt(dim))
    blob2 = unit(e2 + 0.9 * rng.standard_normal((per_blob, dim)) / np.sqrt(dim))
    middle = unit(e1 + e2 + 0.6 * rng.standard_normal((pairs, dim)) / np.sqrt(dim))
    side = 0.08 * unit(np.tile(e1 - e2, (pairs, 1)))  # pushes one copy to each side
    left, right = unit(middle + side), unit(middle - side)
    vectors = np.concatenate([blob1, blob2, left, right]).astype(np.float16)
    start = 2 * per_blob
    planted = {(start + k, start + pairs + k) for k in range(pairs)}
    return vectors, planted


def test_pairs_merge_repeats_and_drop_self_hits():
    pairs = Pairs.from_directed(np.array([3, 1, 2, 2]), np.array([1, 3, 2, 5]), np.ones(4))
    assert pairs.as_set() == {(1, 3), (2, 5)}
    merged = Pairs.concat([pairs, Pairs.from_directed(np.array([5]), np.array([2]), [0.5])])
    assert merged.as_set() == {(1, 3), (2, 5)}


def test_greedy_keeps_best_ranked_and_follows_the_paper_on_chains():
    # a-b and b-c are duplicates, a-c are not: keeping a removes b, and c survives, as in
    # the paper (c is not in range of a kept item).
    pairs = Pairs(np.array([0, 1]), np.array([1, 2]), np.array([0.97, 0.96], np.float32))
    first = resolve_pairs(pairs, priority_rank(None, 3))
    assert first.representative.tolist() == [-1, 0, -1]
    assert first.similarity[1] == pytest.approx(0.97)
    # With b scored best, b is kept and removes both a and c.
    best_b = resolve_pairs(pairs, priority_rank(np.array([0.1, 0.9, 0.5]), 3))
    assert best_b.representative.tolist() == [1, -1, 1]
    assert group_roots(best_b.representative).tolist() == [1, 1, 1]


def test_priority_rank_puts_missing_scores_last_and_breaks_ties_by_order():
    rank = priority_rank(np.array([0.5, np.nan, 0.9, 0.5]), 4)
    assert rank.tolist() == [1, 3, 0, 2]


def test_exact_labels_group_equal_bytes_and_keep_the_best():
    blobs = [b"a", b"b", b"a", b"a", None]
    labels = exact_labels([sha256_hex(b) if b else None for b in blobs] + [None])
    decisions = resolve_labels(labels, priority_rank(np.array([1, 0, 3, 2, 0, 0.0]), 6))
    assert decisions.representative.tolist() == [2, -1, -1, 2, -1, -1]  # missing never match
    assert decisions.similarity[0] == 1.0


def test_multiprobe_finds_border_pairs_that_sd3_misses():
    vectors, planted = border_data()
    truth = brute_force_pairs(vectors, 0.95)
    assert planted <= truth
    found = {}
    for mode in ("sd3", "multiprobe"):
        config = DedupConfig(semantic_mode=mode, n_clusters=2, probe_fraction=0.5)
        found[mode] = SemanticDeduplicator(config).find_pairs(vectors).as_set()
        assert found[mode] <= truth, mode  # every pair reported is a true pair
    assert len(found["sd3"] & planted) < 0.5 * len(planted)
    assert found["multiprobe"] == truth


def test_multiprobe_matches_brute_force_on_clustered_data():
    rng = np.random.default_rng(1)
    centres = unit(rng.standard_normal((20, 64)))
    base = unit(centres[rng.integers(0, 20, 1500)] + rng.standard_normal((1500, 64)) / 8)
    copies = unit(base[:300] + 0.25 * rng.standard_normal((300, 64)) / 8)
    vectors = np.concatenate([base, copies]).astype(np.float16)
    truth = brute_force_pairs(vectors, 0.95)
    assert len(truth) >= 250
    pairs = SemanticDeduplicator(DedupConfig(n_clusters=30)).find_pairs(vectors)
    found = pairs.as_set()
    assert found <= truth
    assert len(found) >= 0.99 * len(truth)
    assert np.all(pairs.sim >= 0.95)


def test_multiprobe_at_full_reach_is_exact_even_when_routing_in_a_subspace():
    # The routing guarantee (dedup/routing.py): a row within half the duplicate radius of a
    # border searches the cluster behind it, so with every cluster probeable nothing is
    # missed, even though k-means and assignment run in 12 of 96 dimensions.
    rng = np.random.default_rng(4)
    centres = unit(rng.standard_normal((8, 96)))
    base = unit(centres[rng.integers(0, 8, 1200)] + rng.standard_normal((1200, 96)) / np.sqrt(96))
    # Copies at cosine 0.90-0.99 of their original, moved towards another row (along the
    # data, so the projection keeps most of the offset and borders split pairs).
    towards = unit(base[rng.integers(0, 1200, 400)] - base[:400])
    copies = unit(base[:400] + rng.uniform(0.15, 0.45, (400, 1)) * towards)
    vectors = np.concatenate([base, copies]).astype(np.float16)
    truth = brute_force_pairs(vectors, 0.9)
    common = dict(semantic_threshold=0.9, n_clusters=40, routing_dim=12)
    exact = DedupConfig(semantic_mode="multiprobe", probe_fraction=1.0, max_probes=40, **common)
    assert SemanticDeduplicator(exact).find_pairs(vectors).as_set() == truth
    # The data does straddle borders: sd3, and multiprobe with too short a reach, miss pairs.
    sd3 = SemanticDeduplicator(DedupConfig(semantic_mode="sd3", **common)).find_pairs(vectors)
    assert len(sd3.as_set()) < len(truth) - 10
    short = DedupConfig(semantic_mode="multiprobe", probe_fraction=0.3, max_probes=40, **common)
    assert SemanticDeduplicator(short).find_pairs(vectors).as_set() < truth


def test_projection_only_shrinks_distances():
    from dedup.routing import Projection

    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    project = Projection(x, 8)
    a, b = x[:250], x[250:]
    assert np.all(
        np.linalg.norm(project(a) - project(b), axis=1) <= np.linalg.norm(a - b, axis=1) + 1e-5
    )
    assert project(x).shape == (500, 8) and Projection(x, 64)(x) is x


def test_bf16_kernel_finds_exactly_the_faiss_pairs_with_exact_similarities():
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal((600, 128)))
    # Copies spread across the threshold, many within bf16's error of it.
    copies = unit(
        base[:300] + rng.uniform(0.2, 0.45, (300, 1)) * unit(rng.standard_normal((300, 128)))
    )
    vectors = np.concatenate([base, copies]).astype(np.float16)
    rows = np.arange(len(vectors))
    exact = range_pairs(vectors, rows, rows, 0.95, "faiss")
    fast = range_pairs(vectors, rows, rows, 0.95, "bf16")
    assert 50 < len(exact) < 300
    assert fast.as_set() == exact.as_set() == brute_force_pairs(vectors, 0.95)
    order = np.lexsort((exact.j, exact.i)), np.lexsort((fast.j, fast.i))
    np.testing.assert_allclose(fast.sim[order[1]], exact.sim[order[0]], atol=1e-5)
    finder = SemanticDeduplicator(DedupConfig(n_clusters=4, search_kernel="bf16"))
    assert finder.find_pairs(vectors).as_set() <= exact.as_set()


def test_tiles_respect_the_memory_bound_and_find_the_same_pairs():
    vectors, _ = border_data(per_blob=400)
    config = DedupConfig(n_clusters=2, probe_fraction=0.5)
    finder = SemanticDeduplicator(config)
    rows = np.arange(len(vectors))
    routing = finder.route(vectors, rows, 0.95)
    whole = plan_tiles(rows, routing, vectors.shape[1], 1 << 30)
    bound = 40_000  # bytes: about 150 float32 rows of 32-d per side
    split = plan_tiles(rows, routing, vectors.shape[1], bound)
    assert len(whole) == 2 and len(split) > 2
    assert all(tile.nbytes(vectors.shape[1]) <= bound for tile in split)
    expected = run_tiles_locally(vectors, whole, 0.95).as_set()
    assert run_tiles_locally(vectors, split, 0.95).as_set() == expected


def test_rows_subset_only_pairs_rows_inside_it():
    vectors, planted = border_data()
    rows = np.arange(0, len(vectors), 2)
    pairs = SemanticDeduplicator(DedupConfig(n_clusters=2)).find_pairs(vectors, rows)
    assert len(pairs) and set(pairs.i.tolist()) | set(pairs.j.tolist()) <= set(rows.tolist())


def test_sweep_removes_less_at_higher_thresholds_and_writes_table_and_plot(tmp_path):
    rng = np.random.default_rng(2)
    n = 200
    i = rng.integers(0, n, 300)
    pairs = Pairs.from_directed(i, rng.integers(0, n, 300), rng.uniform(0.9, 1.0, 300))
    thresholds = [0.92, 0.95, 0.98]
    points = sweep(pairs, priority_rank(None, n), thresholds)
    removed = [p.removed for p in points]
    assert removed == sorted(removed, reverse=True) and removed[0] > removed[-1] > 0
    at_95 = resolve_pairs(pairs.at_least(0.95), priority_rank(None, n))
    assert points[1].removed == at_95.dropped.sum()
    write_sweep(points, tmp_path / "sweep.csv", tmp_path / "sweep.png")
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("threshold,removed") and len(lines) == 4
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_earlier_decisions_are_respected():
    pairs = Pairs(np.array([0]), np.array([1]), np.array([0.99], np.float32))
    before = Decisions.all_kept(3)
    before.representative[0] = 2  # row 0 was already dropped by an earlier method
    after = resolve_pairs(pairs, priority_rank(None, 3), before)
    assert after.representative.tolist() == [2, -1, -1]
