"""The funnel of a run and the story of one sample, from manifests and one shard per stage.

The funnel sums each stage folder's shard manifests (rows in and out, drop reasons; dedup
writes one manifest for all its shards) and reads no table, so it costs the number of shards,
not of rows, and stages added later show up without changes here.

One sample: by shard lineage, uid X lives in the same shard k of every stage. k comes from the
download stage's uid index, `download/_uid_index/BB.parquet` (columns uid, shard; BB = two
lowercase hex digits of `uid_bucket(X)`), when that bucket file exists; else from the
download tables' `uid` column alone, one table at a time, stopping at the first hit. Then each
stage's table k (`<stage>/k.parquet`, and for encode also the training index
`encode/shards/k.parquet`) is read for X's rows only (a Parquet filter) and without list or
binary columns (embeddings). Rows carry `<stage>_reason` (null: passed); a few known columns
make the explanation richer (`select_detail`, dedup's representative and similarity).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.command import InputError
from pipeline.core.manifest import MANIFEST_SUFFIX, manifest_shards, stage_stats
from pipeline.core.uids import UID_INDEX_DIR, uid_bucket

STAGE_ORDER = ("download", "score", "select", "dedup", "caption", "encode")
# Extra tables of a stage's shard k that add to its row in a sample's story.
SHARD_EXTRAS = {"encode": ("shards",)}


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


def stage_dirs(run_dir: Path) -> list[Path]:
    """The stage folders of a run that completed at least one shard, in funnel order."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
             and any(p.glob(f"*{MANIFEST_SUFFIX}"))]
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


def funnel(run_dir: str | Path) -> list[StageCount]:
    """Rows in and out of each stage and the histogram of drop reasons, from the manifests."""
    counts = []
    for stage_dir in stage_dirs(Path(run_dir)):
        stats = stage_stats(stage_dir)
        counts.append(StageCount(stage_dir.name, stats["rows_in"], stats["rows_out"],
                                 Counter(stats["reasons"]), stats["rows_per_second"]))
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


def find_shard(run_dir: Path, uid: str) -> str | None:
    """The download shard holding `uid`: from the uid index, else from the uid columns."""
    download = Path(run_dir) / "download"
    index = download / UID_INDEX_DIR / f"{uid_bucket(uid):02x}.parquet"
    if index.exists():
        rows = _read_uid_rows(index, uid, ["uid", "shard"])
        return str(rows["shard"][0].as_py()) if rows.num_rows else None
    for shard in manifest_shards(download):
        table = download / f"{shard}.parquet"
        if table.exists() and _read_uid_rows(table, uid, ["uid"]).num_rows:
            return shard
    return None


def uid_row(path: Path, uid: str) -> dict | None:
    """`uid`'s row of one table without its list and binary columns; None if it has none."""
    if not path.exists():
        return None
    schema = pq.read_schema(path)
    columns = [f.name for f in schema if not _bulky(f.type)]
    if "uid" not in columns:
        return None
    rows = _read_uid_rows(path, uid, columns).to_pylist()
    return rows[0] if rows else None


def explain_uid(run_dir: str | Path, uid: str) -> list[StageVerdict]:
    """What each stage did with `uid`, in funnel order, reading one shard per stage."""
    run_dir = Path(run_dir)
    shard = find_shard(run_dir, uid)
    verdicts = []
    for stage_dir in stage_dirs(run_dir):
        stage = stage_dir.name
        row = uid_row(stage_dir / f"{shard}.parquet", uid) if shard is not None else None
        if row is None:
            verdicts.append(StageVerdict(stage, None))
            continue
        for extra in SHARD_EXTRAS.get(stage, ()):
            row |= {k: v for k, v in (uid_row(stage_dir / extra / f"{shard}.parquet", uid) or {}).items()
                    if k not in row}
        column = reason_column(stage, list(row))
        verdicts.append(StageVerdict(stage, row, row.get(column) if column else None))
    return verdicts


def _read_uid_rows(path: Path, uid: str, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns, filters=[("uid", "=", uid)])
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise InputError(f"{path}: cannot look up uid {uid!r} (columns {columns}): {e}") from e


def _bulky(kind: pa.DataType) -> bool:
    """Embeddings and other lists, image bytes: not worth reading to tell a sample's story."""
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_fixed_size_binary(kind))


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
