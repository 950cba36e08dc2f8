"""The CLIP-score histogram behind clip_top_percent: mergeable, and within its stated error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.select.sketch import BINS, EDGES, ClipSketch

pytestmark = pytest.mark.timeout(30)


def pool(rows: int, seed: int = 0) -> np.ndarray:
    """CLIP-like scores with many ties (3 decimals) and a few missing ones."""
    rng = np.random.default_rng(seed)
    values = np.round(np.clip(rng.normal(0.25, 0.06, rows), -1, 1), 3)
    values[rng.choice(rows, rows // 50, replace=False)] = np.nan
    return values


def test_merging_shard_sketches_equals_one_sketch_of_all_rows():
    values = pool(5000)
    shards = np.array_split(values, 7)
    merged = sum((ClipSketch.of(s) for s in shards), ClipSketch())
    assert merged == ClipSketch.of(values)
    assert merged.rows == int((~np.isnan(values)).sum())  # missing scores are not ranked
    # Order does not matter either, and the JSON form round-trips.
    reverse = sum((ClipSketch.of(s) for s in reversed(shards)), ClipSketch())
    assert reverse == merged
    assert ClipSketch.from_json(merged.to_json("sha")) == merged


@pytest.mark.parametrize("percent", [0.5, 10.0, 30.0, 77.7, 100.0])
def test_cut_is_within_one_bin_of_the_exact_sort(percent):
    values = pool(4000, seed=1)
    scored = values[~np.isnan(values)]
    ranked = np.sort(scored)[::-1]
    target = max(math.ceil(scored.size * percent / 100), 1)
    cut = ClipSketch.of(values).cut(percent)

    kept = int((scored >= cut.value).sum())
    assert (cut.pool, cut.target, cut.kept) == (scored.size, target, kept)  # what it reports is so
    # Never fewer than asked; over by less than the rows of the cut's bin (the stated bound).
    assert target <= kept <= target + cut.bin_rows - 1
    assert kept / scored.size - percent / 100 < cut.bin_rows / scored.size
    # Everything the exact sort keeps (the T best, plus ties) is kept.
    assert cut.value <= ranked[target - 1]
    assert 0 < cut.bin_rows <= int(((scored >= cut.value) & (scored < cut.value + 2 / BINS)).sum())


def test_edges_and_the_rule_agree_at_the_boundaries():
    edge = EDGES[BINS // 2 + 100]
    values = np.array([edge, np.nextafter(edge, -2), 1.0, 1.0000001, -1.0, -1.0000001])
    sketch = ClipSketch.of(values)
    assert sketch.rows == 6
    cut = sketch.cut(100 * 3 / 6)  # the best three: 1.0000001, 1.0 and `edge` itself
    assert cut.value == edge and cut.kept == int((values >= cut.value).sum()) == 3
    everything = sketch.cut(100.0)
    assert everything.value == -math.inf and everything.kept == 6
    assert ClipSketch().cut(30.0).value == math.inf  # an empty pool keeps nothing
