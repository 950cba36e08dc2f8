"""Select's rules over one score shard: which rows to keep, and why each dropped row went.

The rules run in a fixed order; a dropped row names the first rule it failed
(`select_reason`) with the value and the threshold (`select_detail`). Per shard a tally counts,
per rule, `removed` (rows that rule dropped first; these add up to the dropped rows) and
`failed` (rows failing it regardless of order); it travels in the shard manifest's `extra`, so
the driver merges `select/rules.parquet` without reading any table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.select.config import SelectConfig, SelectError

if TYPE_CHECKING:
    from pipeline.select.sketch import ClipCut

SCORE_COLUMNS = [
    "uid", "score_reason", "score_clip", "score_aesthetic", "score_nsfw",
    "score_width", "score_height", "score_caption_length", "score_caption_words",
]
KEPT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("select_kept", pa.bool_()),
        ("select_reason", pa.string()),
        ("select_detail", pa.string()),
    ]
)


@dataclass
class Rule:
    name: str  # the select_reason it gives
    threshold: str
    keep: Callable[[dict[str, np.ndarray]], np.ndarray]  # columns -> bool mask of rows kept
    detail: Callable[[dict[str, np.ndarray], int], str]

    @property
    def column(self) -> str:
        return self.threshold.split()[0]


def build_rules(config: SelectConfig, clip_cut: ClipCut | None) -> list[Rule]:
    """The active rules, in the order that attributes each dropped row to one of them."""
    c = config.resolved()
    rules = []
    if c.nsfw_max is not None:
        rules.append(_threshold("nsfw", "score_nsfw", "<", c.nsfw_max))
    if c.aesthetic_min is not None:
        rules.append(_threshold("aesthetic_low", "score_aesthetic", ">=", c.aesthetic_min))
    if c.clip_min is not None:
        rules.append(_threshold("clip_low", "score_clip", ">=", c.clip_min))
    if clip_cut is not None:
        # Six digits: neighbouring bin edges (3e-5 apart) must print differently.
        why = f"top {clip_cut.percent:g}% cut, a histogram bin edge: may keep < 1 bin's rows more"
        rules.append(_threshold("clip_not_top_percent", "score_clip", ">=", clip_cut.value,
                                digits=6, why=why))
    if c.min_side is not None:
        rules.append(_threshold("image_too_small", "min_side", ">=", c.min_side))
    if c.max_aspect is not None:
        rules.append(_threshold("aspect_too_extreme", "max_aspect", "<", c.max_aspect))
    if c.min_caption_words is not None:
        rules.append(_threshold("caption_too_short", "score_caption_words", ">=", c.min_caption_words))
    if c.min_caption_chars is not None:
        rules.append(_threshold("caption_too_short", "score_caption_length", ">=", c.min_caption_chars))
    if c.english_like:
        rules.append(_threshold("caption_not_english", "ascii_letter_fraction", ">=", 0.9))
    for column, value in sorted((c.column_min or {}).items()):
        rules.append(_threshold(f"{column}_too_low", upstream(column), ">=", value))
    for column, value in sorted((c.column_max or {}).items()):
        rules.append(_threshold(f"{column}_too_high", upstream(column), "<", value))
    return rules


UPSTREAM = "download."  # rule columns read from download/k.parquet carry this prefix


def upstream(column: str) -> str:
    return UPSTREAM + column


def upstream_columns(rules: list[Rule]) -> list[str]:
    """The download-table columns the column rules read."""
    return sorted({r.column[len(UPSTREAM):] for r in rules if r.column.startswith(UPSTREAM)})


def check_upstream_columns(rules: list[Rule], download_file: Path | None) -> None:
    """A column rule on a column this shard's download table lacks (or that is not numeric)
    is an error naming the column, the file and the numeric columns it has."""
    wanted = upstream_columns(rules)
    if not wanted:
        return
    schema = pq.read_schema(download_file)
    numeric = sorted(f.name for f in schema if pa.types.is_integer(f.type)
                     or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type))
    for column in wanted:
        if column not in numeric:
            what = "is not numeric" if column in schema.names else "has no such column"
            raise SelectError(
                f"select rule on column {column!r}: {download_file} {what}; its numeric "
                f"columns: {numeric} (upstream columns come from the URL list: see "
                "download.preset / download.passthrough_columns)")


def _threshold(name: str, column: str, op: str, value: float, digits: int = 4,
               why: str | None = None) -> Rule:
    compare = {">=": np.greater_equal, "<": np.less}[op]
    suffix = f" ({why})" if why else ""

    def keep(cols: dict[str, np.ndarray]) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return compare(cols[column], value)  # NaN (missing score) compares False: dropped

    def detail(cols: dict[str, np.ndarray], row: int) -> str:
        failed = {">=": "<", "<": ">="}[op]
        return f"{column}={cols[column][row]:.4g} {failed} {value:.{digits}g}{suffix}"

    return Rule(name, f"{column} {op} {value:.{digits}g}", keep, detail)


def ascii_letter_fraction(caption: str | None) -> float:
    letters = [ch for ch in caption or "" if ch.isalpha()]
    return sum(ch.isascii() for ch in letters) / len(letters) if letters else 0.0


def read_score_table(path: Path, columns: list[str]) -> pa.Table:
    """Columns of a score (or download) table; a missing column is an error naming the file."""
    missing = sorted(set(columns) - set(pq.read_schema(path).names))
    if missing:
        raise SelectError(f"{path} has no column(s) {missing}: not a score table of this version")
    return pq.read_table(path, columns=columns)


def check_scores_present(rules: list[Rule], score_file: Path) -> None:
    """A rule on a score no row of the shard has (no head weights) fails instead of dropping all."""
    for column in sorted({r.column for r in rules} & {"score_aesthetic", "score_nsfw"}):
        table = read_score_table(score_file, [column, "score_reason"])
        scored = table.filter(pc.is_null(table["score_reason"]))
        if scored.num_rows and scored[column].null_count == scored.num_rows:
            raise SelectError(
                f"a select rule needs {column}, but no scored row of {score_file} has it: run the "
                "score stage with the matching head weights (score.aesthetic_weights / "
                "score.nsfw_weights), or unset the rule"
            )


def read_columns(score_file: Path, download_file: Path | None,
                 columns_from_download: tuple[str, ...] | list[str] = ()) -> dict[str, np.ndarray]:
    """The columns the rules look at, for the rows the score stage kept; upstream columns
    (`columns_from_download`) come as `download.NAME`."""
    table = read_score_table(score_file, SCORE_COLUMNS)
    table = table.filter(pc.is_null(table["score_reason"]))
    cols = {name: table[name].to_numpy(zero_copy_only=False) for name in SCORE_COLUMNS}
    cols = {k: (v if k in ("uid", "score_reason") else v.astype(np.float64)) for k, v in cols.items()}
    width, height = cols["score_width"], cols["score_height"]
    cols["min_side"] = np.minimum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["max_aspect"] = np.maximum(width / height, height / width)
    if download_file is not None:
        extra = list(columns_from_download)
        table = read_score_table(download_file, ["uid", "caption", *extra]
                                 + (["download_status"] if "download_status" in
                                    pq.read_schema(download_file).names else []))
        if "download_status" in table.column_names:  # a duplicate uid's failed row: not it
            table = table.filter(pc.equal(table["download_status"], "success"))
        download = table.to_pydict()
        row_of = {uid: i for i, uid in enumerate(download["uid"])}
        rows = [row_of.get(uid) for uid in cols["uid"]]
        caption_of = download["caption"]
        cols["ascii_letter_fraction"] = np.array(
            [ascii_letter_fraction(None if r is None else caption_of[r]) for r in rows],
            dtype=np.float64)
        for name in extra:  # a null (or a row without one) is NaN: it fails the rule
            values = table[name].cast(pa.float64()).to_numpy(zero_copy_only=False)
            cols[upstream(name)] = np.array([np.nan if r is None else values[r] for r in rows],
                                            dtype=np.float64)
    return cols


def decide(rules: list[Rule], cols: dict[str, np.ndarray], tally: Tally) -> pa.Table:
    """Keep/drop each row; a dropped row names the first rule it failed."""
    rows = len(cols["uid"])
    reasons: list[str | None] = [None] * rows
    details: list[str | None] = [None] * rows
    for index, rule in enumerate(rules):
        fails = ~rule.keep(cols)
        tally.failed[index] += int(fails.sum())
        for row in np.flatnonzero(fails):
            if reasons[row] is None:
                reasons[row], details[row] = rule.name, rule.detail(cols, row)
                tally.removed[index] += 1
    tally.rows += rows
    kept = [r is None for r in reasons]
    return pa.table(
        {"uid": cols["uid"], "select_kept": kept, "select_reason": reasons, "select_detail": details},
        schema=KEPT_SCHEMA,
    )


class Tally:
    """Counts per rule, for one shard or merged over shards."""

    def __init__(self, rules: list[Rule]):
        self.names = [r.name for r in rules]
        self.thresholds = [r.threshold for r in rules]
        self.rows = 0
        self.removed = [0] * len(rules)
        self.failed = [0] * len(rules)

    def removed_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, count in zip(self.names, self.removed, strict=True):
            if count:
                out[name] = out.get(name, 0) + count
        return out

    def to_json(self) -> list[dict]:
        """The per-rule counts for a shard manifest's `extra`."""
        return [{"rule": n, "threshold": t, "removed": r, "failed": f} for n, t, r, f
                in zip(self.names, self.thresholds, self.removed, self.failed, strict=True)]

    def add_json(self, counts: list[dict], where: Path) -> None:
        """Add a shard's `to_json()` counts; they must be for the same rules, in order."""
        if [(c["rule"], c["threshold"]) for c in counts] != list(zip(self.names, self.thresholds, strict=True)):
            raise SelectError(f"{where} counts other rules than this run's; rerun select")
        for i, c in enumerate(counts):
            self.removed[i] += int(c["removed"])
            self.failed[i] += int(c["failed"])

    def rules_table(self, notes: dict[str, str] | None = None) -> pa.Table:
        notes = notes or {}
        return pa.table(
            {
                "rule": pa.array(self.names, pa.string()),
                "threshold": pa.array(self.thresholds, pa.string()),
                "removed": pa.array(self.removed, pa.int64()),
                "failed": pa.array(self.failed, pa.int64()),
                "note": pa.array([notes.get(n) for n in self.names], pa.string()),
            }
        )
