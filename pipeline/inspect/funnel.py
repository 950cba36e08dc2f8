"""The funnel of a run and the story of one sample, read from the stages' Parquet alone.

Every stage folder of a run holds Parquet tables keyed by `uid` with a `<stage>_reason`
column (null: the row passed). That contract is all this module relies on, so stages added
later (dedup, caption, encode) show up without changes here; a few known columns just make
the explanation richer (`select_detail`, dedup's representative and similarity).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.manifest import stage_stats

STAGE_ORDER = ("download", "score", "select", "dedup", "caption", "encode")


@dataclass
class StageCount:
    stage: str
    rows_in: int = 0
    rows_out: int = 0
    reasons: Counter = field(default_factory=Counter)
    rows_per_second: float | None = None


@dataclass
class StageVerdict:
    stage: str
    row: dict | None  # the uid's row in this stage, None when the stage has none
    reason: str | None = None

    @property
    def dropped(self) -> bool:
        return self.reason is not None


def reason_column(stage: str, schema_names: list[str]) -> str | None:
    if f"{stage}_reason" in schema_names:
        return f"{stage}_reason"
    candidates = [n for n in schema_names if n.endswith("_reason")]
    return candidates[0] if len(candidates) == 1 else None


def stage_tables(run_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Per stage (in funnel order), its uid-keyed tables and their reason column."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for stage_dir in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        for path in sorted(stage_dir.rglob("*.parquet")):
            parts = path.relative_to(stage_dir).parts
            if any(part.startswith((".", "_")) for part in parts):  # being written; inputs
                continue
            names = pq.read_schema(path).names
            column = reason_column(stage_dir.name, names)
            if "uid" in names and column:
                found.setdefault(stage_dir.name, []).append((path, column))
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def funnel(run_dir: str | Path) -> list[StageCount]:
    """Rows in and out of each stage and the histogram of drop reasons."""
    counts = []
    for stage, tables in stage_tables(Path(run_dir)).items():
        count = StageCount(stage)
        for path, column in tables:
            reasons = pq.read_table(path, columns=[column])[column]
            count.rows_in += len(reasons)
            for item in pc.value_counts(reasons.drop_null()).to_pylist():
                count.reasons[item["values"]] += item["counts"]
        count.rows_out = count.rows_in - sum(count.reasons.values())
        count.rows_per_second = stage_stats(Path(run_dir) / stage)["rows_per_second"]
        counts.append(count)
    return counts


def format_funnel(counts: list[StageCount]) -> str:
    lines = [f"{'stage':<12}{'in':>10}{'out':>10}{'dropped':>10}{'rows/s':>10}"]
    previous_out = None
    for c in counts:
        speed = f"{c.rows_per_second:.1f}" if c.rows_per_second else "-"
        lines.append(f"{c.stage:<12}{c.rows_in:>10}{c.rows_out:>10}"
                     f"{c.rows_in - c.rows_out:>10}{speed:>10}")
        for reason, n in c.reasons.most_common():
            lines.append(f"  {reason:<30}{n:>10}")
        if previous_out is not None and c.rows_in != previous_out:
            lines.append(f"  note: {c.stage} saw {c.rows_in} rows, the stage before passed "
                         f"{previous_out} (stage not run on every shard yet, or it reads all rows)")
        previous_out = c.rows_out
    return "\n".join(lines)


def explain_uid(run_dir: str | Path, uid: str) -> list[StageVerdict]:
    """What each stage did with `uid`, in funnel order."""
    verdicts = []
    for stage, tables in stage_tables(Path(run_dir)).items():
        verdict = StageVerdict(stage, None)
        for path, column in tables:
            rows = pq.read_table(path, filters=[("uid", "=", uid)]).to_pylist()
            if rows:
                verdict = StageVerdict(stage, _small(rows[0]), rows[0].get(column))
                break
        verdicts.append(verdict)
    return verdicts


def _small(row: dict) -> dict:
    """The row without embeddings and other long lists (not worth printing)."""
    return {k: v for k, v in row.items() if not isinstance(v, list | bytes)}


def format_story(uid: str, verdicts: list[StageVerdict]) -> str:
    if not any(v.row for v in verdicts):
        return f"uid {uid} is not in this run (no stage has a row for it)"
    lines = []
    summary = f"uid {uid} was kept by every stage that has run"
    dropped_by = None
    for v in verdicts:
        if v.row is None:
            why = f"dropped by {dropped_by} before" if dropped_by else "not processed (yet)"
            lines.append(f"{v.stage:<10} no row: {why}")
            continue
        if v.dropped:
            why = drop_explanation(v)
            lines.append(f"{v.stage:<10} DROPPED: {why}")
            if dropped_by is None:
                dropped_by = v.stage
                summary = f"uid {uid} was dropped by {v.stage}: {why}"
        else:
            lines.append(f"{v.stage:<10} passed {_highlights(v)}".rstrip())
    return "\n".join([summary, "", *lines])


def drop_explanation(v: StageVerdict) -> str:
    row, prefix = v.row, v.stage
    representative = row.get(f"{prefix}_representative")
    if representative is not None:
        similarity = row.get(f"{prefix}_similarity")
        sim = f", similarity {similarity:.2f}" if isinstance(similarity, float) else ""
        kind = {"exact_duplicate": "an exact copy", "perceptual_duplicate": "a perceptual "
                "(pHash) duplicate"}.get(str(v.reason), "a near-duplicate")
        return f"{v.reason}: {kind} of uid {representative}{sim}"
    for extra in ("detail", "error"):
        if row.get(f"{prefix}_{extra}"):
            return f"{v.reason} ({row[f'{prefix}_{extra}']})"
    return str(v.reason)


def _highlights(v: StageVerdict) -> str:
    shown = []
    for key, value in v.row.items():
        if key == "uid" or key.endswith("_reason") or value is None:
            continue
        if isinstance(value, float):
            shown.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str | bool) and len(str(value)) <= 60:
            shown.append(f"{key}={value}")
    return ", ".join(shown[:8])
