"""Threshold sweep: the fraction of samples removed at each similarity threshold.

The paper plots this to pick its threshold. Pairs are searched once at the lowest threshold
and filtered for each higher one, so the sweep costs one search plus a greedy pass per point.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dedup.pairs import Pairs  # noqa: E402
from dedup.representatives import Decisions, resolve_pairs  # noqa: E402

SWEEP_TABLE = "sweep.csv"
SWEEP_PLOT = "sweep.png"


@dataclass
class SweepPoint:
    threshold: float
    removed: int
    considered: int

    @property
    def fraction_removed(self) -> float:
        return self.removed / self.considered if self.considered else 0.0


def sweep(
    pairs: Pairs,
    rank: np.ndarray,
    thresholds: list[float],
    before: Decisions | None = None,
    considered: int | None = None,
) -> list[SweepPoint]:
    """Rows removed at each threshold, of `considered` rows (default: those `before` kept)."""
    base = before or Decisions.all_kept(len(rank))
    if considered is None:
        considered = int((~base.dropped).sum())
    points = []
    for threshold in sorted(thresholds):
        start = Decisions(base.representative.copy(), base.similarity.copy())
        result = resolve_pairs(pairs.at_least(threshold), rank, start)
        removed = int(result.dropped.sum() - base.dropped.sum())
        points.append(SweepPoint(threshold, removed, considered))
    return points


def write_sweep(points: list[SweepPoint], table: Path, plot: Path, label: str = "") -> None:
    """The sweep as a CSV table and a PNG plot (paths may be temporary names)."""
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["threshold", "removed", "considered", "fraction_removed"])
        for p in points:
            writer.writerow([p.threshold, p.removed, p.considered, f"{p.fraction_removed:.6f}"])
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
    axes.plot([p.threshold for p in points], [100 * p.fraction_removed for p in points], "o-")
    axes.set_xlabel("cosine similarity threshold")
    axes.set_ylabel("samples removed (%)")
    axes.set_title(f"Semantic dedup threshold sweep {label}".strip())
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot, format="png")
    plt.close(figure)


def format_sweep(points: list[SweepPoint]) -> str:
    """A Markdown table of the sweep (for logs and docs)."""
    lines = ["| threshold | removed | fraction removed |", "|---|---|---|"]
    lines += [f"| {p.threshold:.3f} | {p.removed} | {p.fraction_removed:.4f} |" for p in points]
    return "\n".join(lines)
