"""How well the demo's dedup did against the shapes world's planted near-duplicates.

The world records each planted copy's source (`duplicate_of`, demo/shapes_world.py), so a
dedup drop can be checked: it is right when the dropped image and the one it was kept for
come from the same original scene render. Everything else it drops is a distinct image lost
to training (at 64 px, pHash groups same-colour scenes of another shape or size).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class DedupTruth:
    dropped: int  # rows dedup dropped as duplicates
    correct: int  # drops of a planted copy (or its source) kept for the other one
    planted_pairs: int  # planted (source, copy) pairs with both rows in dedup's input

    @property
    def precision(self) -> float:
        return self.correct / self.dropped if self.dropped else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.planted_pairs if self.planted_pairs else 1.0


def _dedup_rows(dedup_dir: Path) -> list[dict]:
    files = [f for f in sorted(dedup_dir.glob("*.parquet")) if not f.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"{dedup_dir} holds no dedup output")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist()


def dedup_against_truth(dedup_dir: str | Path, urls_parquet: str | Path) -> DedupTruth:
    """Precision and recall of one dedup output against the world's planted copies."""
    world = pq.read_table(urls_parquet, columns=["id", "duplicate_of"]).to_pylist()
    family = {r["id"]: r["duplicate_of"] or r["id"] for r in world}  # copy -> its source
    rows = _dedup_rows(Path(dedup_dir))
    members = Counter(family.get(r["uid"], r["uid"]) for r in rows)  # source -> rows present
    drops = [r for r in rows if r.get("dedup_reason")]
    correct = sum(family.get(r["uid"], r["uid"]) == family.get(r["dedup_representative"])
                  for r in drops)
    return DedupTruth(len(drops), int(correct), sum(n >= 2 for n in members.values()))
