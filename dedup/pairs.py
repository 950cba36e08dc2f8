"""Duplicate pairs: the common currency of every method (row indices and a similarity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Pairs:
    """Undirected pairs of row indices with i < j, each pair once, and their similarity."""

    i: np.ndarray  # (P,) int64
    j: np.ndarray  # (P,) int64
    sim: np.ndarray  # (P,) float32

    def __len__(self) -> int:
        return len(self.i)

    @classmethod
    def empty(cls) -> Pairs:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    @classmethod
    def from_directed(cls, a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> Pairs:
        """Pairs from (a, b) hits in any orientation: self-hits dropped, repeats merged."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        sim = np.asarray(sim, np.float32)
        keep = a != b
        lo, hi, sim = np.minimum(a, b)[keep], np.maximum(a, b)[keep], sim[keep]
        # One key per pair; the same pair found from both sides or two clusters counts once.
        key = lo * (int(max(hi.max(initial=0), lo.max(initial=0))) + 1) + hi
        _, first = np.unique(key, return_index=True)
        return cls(lo[first], hi[first], sim[first])

    @classmethod
    def concat(cls, parts: list[Pairs]) -> Pairs:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls.from_directed(
            np.concatenate([p.i for p in parts]),
            np.concatenate([p.j for p in parts]),
            np.concatenate([p.sim for p in parts]),
        )

    def at_least(self, threshold: float) -> Pairs:
        return self.where(self.sim >= threshold)

    def where(self, keep: np.ndarray) -> Pairs:
        """The pairs where the (P,) boolean mask `keep` is true."""
        return Pairs(self.i[keep], self.j[keep], self.sim[keep])

    def restricted_to(self, rows: np.ndarray) -> Pairs:
        """Map pairs found among a subset (local indices) back to the full table's rows."""
        rows = np.asarray(rows, np.int64)
        return Pairs.from_directed(rows[self.i], rows[self.j], self.sim)

    def as_set(self) -> set[tuple[int, int]]:
        return set(zip(self.i.tolist(), self.j.tolist(), strict=True))
