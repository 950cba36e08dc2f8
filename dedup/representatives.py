"""Which duplicate is kept: the paper's greedy pass, visiting items best-first instead of by id.

SD3 marks every item within range of an earlier, not-yet-removed item as a duplicate, so the
first item of a group survives. Here "earlier" means "better by a configurable score"
(aesthetic, CLIP score, resolution); ordering by input position ("first") is the paper's
procedure exactly. Every dropped item records the kept item it duplicates and how similar
they are, which is what `rectiflow inspect` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedup.pairs import Pairs


@dataclass
class Decisions:
    """Per row: the row it duplicates (-1: kept) and their similarity (NaN: kept)."""

    representative: np.ndarray  # (N,) int64
    similarity: np.ndarray  # (N,) float32

    @classmethod
    def all_kept(cls, n: int) -> Decisions:
        return cls(np.full(n, -1, np.int64), np.full(n, np.nan, np.float32))

    @property
    def dropped(self) -> np.ndarray:
        return self.representative >= 0

    def fraction_removed(self) -> float:
        n = len(self.representative)
        return float(self.dropped.sum()) / n if n else 0.0


def priority_rank(score: np.ndarray | None, n: int) -> np.ndarray:
    """rank[row]: 0 for the best row. Higher score is better; NaN last; ties by row order."""
    rows = np.arange(n)
    if score is None:
        return rows
    score = np.asarray(score, np.float64)
    key = np.where(np.isnan(score), np.inf, -score)
    order = np.lexsort((rows, key))
    rank = np.empty(n, np.int64)
    rank[order] = rows
    return rank


def resolve_pairs(pairs: Pairs, rank: np.ndarray, decisions: Decisions | None = None) -> Decisions:
    """The greedy pass over duplicate pairs: best-ranked items keep, their neighbours drop.

    Rows already dropped in `decisions` (by an earlier method) take no part.
    """
    n = len(rank)
    out = decisions or Decisions.all_kept(n)
    if not len(pairs):
        return out
    src = np.concatenate([pairs.i, pairs.j])
    dst = np.concatenate([pairs.j, pairs.i])
    sim = np.concatenate([pairs.sim, pairs.sim])
    order = np.argsort(src, kind="stable")
    src, dst, sim = src[order], dst[order], sim[order]
    starts = np.searchsorted(src, np.arange(n + 1))
    decided = out.dropped.copy()  # a row dropped earlier neither keeps nor removes
    involved = np.unique(src)
    for row in involved[np.argsort(rank[involved], kind="stable")].tolist():
        if decided[row]:
            continue
        decided[row] = True  # kept: it removes every undecided, worse-ranked neighbour
        lo, hi = starts[row], starts[row + 1]
        neighbours, sims = dst[lo:hi], sim[lo:hi]
        hit = ~decided[neighbours] & (rank[neighbours] > rank[row])
        victims = neighbours[hit]
        decided[victims] = True
        out.representative[victims] = row
        out.similarity[victims] = sims[hit]
    return out


def resolve_labels(
    labels: np.ndarray, rank: np.ndarray, decisions: Decisions | None = None, similarity=1.0
) -> Decisions:
    """Equivalence classes (equal sha256): the best-ranked live member of each class is kept."""
    n = len(rank)
    out = decisions or Decisions.all_kept(n)
    live = np.flatnonzero(~out.dropped)
    if not len(live):
        return out
    order = live[np.lexsort((rank[live], labels[live]))]
    sorted_labels = labels[order]
    first = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    head = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    dup = order[~first]
    out.representative[dup] = head[~first]
    out.similarity[dup] = similarity
    return out


def group_roots(representative: np.ndarray) -> np.ndarray:
    """The kept row at the end of each row's chain of representatives (a kept row: itself)."""
    root = np.where(representative >= 0, representative, np.arange(len(representative)))
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt
