"""The CLIP-score histogram behind `clip_top_percent`: mergeable, so no global sort.

Each score shard gets a fixed-bin histogram of its scored rows' `score_clip` (BINS equal bins
over [-1, 1], the range of a cosine), cached sparse (non-empty bins only) in
`select/_sketch/<shard>.json` with the checksum the score manifest recorded for the table it
counted, so a rerun reads only the score shards that changed; their sum is cached in
`_pool.json` under the digest of every shard's checksum. Sketches merge by adding counts:
the merged sketch is exactly the sketch of all rows, whatever the sharding.

The cut is the lower edge of the bin in which the count from the top first reaches
T = ceil(N * k / 100) of the N scored rows. Every row in that bin or above is kept, so the kept
count K satisfies T <= K <= T + (rows in the cut's bin) - 1: never fewer than asked, and over
by less than one bin's rows (an exact sort keeps T rows plus ties at the T-th score). With
2^16 bins a bin is 3e-5 wide; `select/rules.parquet` reports K, T and the bin's rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.manifest import write_json_atomic
from pipeline.select.rules import read_score_table

BINS = 1 << 16
# Bin b holds EDGES[b] <= x < EDGES[b + 1]; searchsorted on these very edges and the rule's
# `score_clip >= EDGES[b]` agree exactly, so the rows the sketch counts as kept are the rows
# the rule keeps.
EDGES = np.linspace(-1.0, 1.0, BINS + 1)
SKETCH_DIR = "_sketch"


@dataclass(frozen=True)
class ClipCut:
    """Where `clip_top_percent` cuts the pool and how far the kept share is from the ask."""

    value: float  # keep score_clip >= value (-inf: every scored row; inf: an empty pool)
    percent: float
    pool: int  # N: scored rows with a CLIP score
    target: int  # T = ceil(N * percent / 100), at least 1
    kept: int  # K: rows at or above the cut
    bin_rows: int  # rows in the cut's bin: K - T < bin_rows

    def note(self) -> str:
        share = 100.0 * self.kept / self.pool if self.pool else 0.0
        return (f"kept {self.kept} of {self.pool} scored rows ({share:.4g}%) for the asked "
                f"{self.percent:g}% ({self.target} rows): the cut is an edge of a {BINS}-bin "
                f"histogram over [-1, 1], so it keeps at most the cut's bin ({self.bin_rows} "
                f"rows) minus one over the ask; here {self.kept - self.target} over")


class ClipSketch:
    """Counts of CLIP scores per fixed bin; `a + b` is the sketch of both sets of rows."""

    def __init__(self, counts: np.ndarray | None = None):
        self.counts = np.zeros(BINS, np.int64) if counts is None else counts

    @classmethod
    def of(cls, values: np.ndarray) -> ClipSketch:
        values = np.asarray(values, np.float64)
        values = values[~np.isnan(values)]  # missing scores are dropped by the rule, not ranked
        index = np.clip(np.searchsorted(EDGES, values, side="right") - 1, 0, BINS - 1)
        return cls(np.bincount(index, minlength=BINS).astype(np.int64))

    def __add__(self, other: ClipSketch) -> ClipSketch:
        return ClipSketch(self.counts + other.counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClipSketch) and np.array_equal(self.counts, other.counts)

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def to_json(self, source_sha256: str) -> dict:
        filled = np.flatnonzero(self.counts)
        return {"bins": BINS, "source_sha256": source_sha256, "index": filled.tolist(),
                "count": self.counts[filled].tolist()}

    @classmethod
    def from_json(cls, data: dict) -> ClipSketch:
        counts = np.zeros(BINS, np.int64)
        counts[np.asarray(data["index"], np.int64)] = np.asarray(data["count"], np.int64)
        return cls(counts)

    def cut(self, percent: float) -> ClipCut:
        """The bin edge that keeps the best `percent` of the pool (see the module doc)."""
        pool = self.rows
        if pool == 0:
            return ClipCut(math.inf, percent, 0, 0, 0, 0)
        target = max(math.ceil(pool * percent / 100.0), 1)
        from_top = np.cumsum(self.counts[::-1])  # from_top[i]: rows in bins >= BINS - 1 - i
        i = int(np.searchsorted(from_top, target))  # the first i reaching the target
        b = BINS - 1 - i
        # Bin 0 also holds the (rounding) scores below -1, so cutting there keeps everything.
        value = float(EDGES[b]) if b > 0 else -math.inf
        return ClipCut(value, percent, pool, target, int(from_top[i]), int(self.counts[b]))


POOL_SKETCH = "_pool.json"  # the merged sketch, beside the per-shard ones


def pool_sketch(select_dir: Path, shards: list[tuple[str, Path, str]]) -> ClipSketch:
    """The sketch of every scored row: (shard, score table, its recorded sha256) per shard.

    Cached under the digest of all shards' checksums, so a rerun with nothing changed reads
    one file instead of one per shard (at 1M rows in 1,000 shards, reading and summing the
    shard sketches was 8% of select's first run)."""
    key = hashlib.sha256(json.dumps(sorted((s, sha) for s, _, sha in shards)).encode()).hexdigest()
    cache = Path(select_dir) / SKETCH_DIR / POOL_SKETCH
    pool = _cached(cache, key)
    if pool is None:
        counts = np.zeros(BINS, np.int64)
        for shard, table, sha in shards:
            counts += shard_sketch(select_dir, shard, table, sha).counts
        pool = _store(cache, ClipSketch(counts), key)
    return pool


def shard_sketch(select_dir: Path, shard: str, score_table: Path, score_sha256: str) -> ClipSketch:
    """The sketch of one score shard: from the cache when it counted this very table."""
    cache = Path(select_dir) / SKETCH_DIR / f"{shard}.json"
    sketch = _cached(cache, score_sha256)
    if sketch is None:
        table = read_score_table(score_table, ["score_clip", "score_reason"])
        scored = table.filter(pc.is_null(table["score_reason"]))["score_clip"]
        values = pc.cast(scored, pa.float64()).to_numpy(zero_copy_only=False)
        sketch = _store(cache, ClipSketch.of(values), score_sha256)
    return sketch


def _cached(cache: Path, source_sha256: str) -> ClipSketch | None:
    """The cached sketch if it counted exactly `source_sha256`; a damaged file is recounted,
    never trusted."""
    if not cache.exists():
        return None
    try:
        data = json.loads(cache.read_text())
        if data.get("source_sha256") == source_sha256 and data.get("bins") == BINS:
            return ClipSketch.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
        pass
    return None


def _store(cache: Path, sketch: ClipSketch, source_sha256: str) -> ClipSketch:
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, sketch.to_json(source_sha256))
    return sketch
