"""The select step: a query over the scores that names which samples to keep. Nothing is deleted.

Select reads every row that the score stage scored (`score_reason` null; rows the score
stage dropped are explained there), applies the configured rules in a fixed order and writes
- `select/kept.parquet`: uid, select_kept, select_reason (the first rule that failed, null
  when kept), select_detail (the value and the threshold, e.g. "score_nsfw=0.91 >= 0.5");
- `select/rules.parquet`: per rule its threshold, `removed` (rows that rule dropped first;
  these add up to all dropped rows) and `failed` (rows failing it regardless of order).
It is global (a top-k% threshold needs every score), so it runs as one "shard" named `all`
with a manifest: a rerun with the same config and inputs does nothing.

Presets: `datacomp_basic` follows DataComp's basic filter (English caption, more than two
words and five characters, smaller side over 200 pixels, aspect ratio under 3). DataComp
detects English with fasttext, which needs a model file we cannot fetch offline; here a
caption counts as English-like when at least 90% of its letters are ASCII, which keeps
other Latin-script languages (documented in docs/queries.md). `datacomp_clip_top30` keeps
the best 30% of the pool by CLIP score (DataComp's "CLIP score (L/14 30%)" baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import config_hash
from pipeline.core.manifest import ShardManifest, completed_manifest, manifest_shards, shard_outputs

PRESETS: dict[str, dict[str, object]] = {
    "none": {},
    "datacomp_basic": {
        "english_like": True,
        "min_caption_words": 3,  # "more than two words"
        "min_caption_chars": 6,  # "more than five characters"
        "min_side": 201,  # "smaller dimension more than 200 pixels"
        "max_aspect": 3.0,  # "aspect ratio smaller than 3" (either orientation)
    },
    "datacomp_clip_top30": {"clip_top_percent": 30.0},
}
SCORE_COLUMNS = [
    "uid", "score_reason", "score_clip", "score_aesthetic", "score_nsfw",
    "score_width", "score_height", "score_caption_length", "score_caption_words",
]


@dataclass
class SelectConfig:
    """Unset (None) rules are off; a preset fills only the fields left unset."""

    preset: Literal["none", "datacomp_basic", "datacomp_clip_top30"] = "none"
    nsfw_max: float | None = None  # keep when score_nsfw < nsfw_max
    aesthetic_min: float | None = None  # keep when score_aesthetic >= aesthetic_min
    clip_min: float | None = None  # keep when score_clip >= clip_min (cosine)
    clip_top_percent: float | None = None  # keep the best k% of the scored pool by score_clip
    min_side: int | None = None  # keep when min(width, height) >= min_side
    max_aspect: float | None = None  # keep when max(w/h, h/w) < max_aspect
    min_caption_words: int | None = None
    min_caption_chars: int | None = None
    english_like: bool | None = None

    def __post_init__(self):
        if self.clip_top_percent is not None and not 0 < self.clip_top_percent <= 100:
            raise ValueError(f"clip_top_percent = {self.clip_top_percent} must be in (0, 100]")

    def resolved(self) -> SelectConfig:
        """This config with the preset's values filled into the fields left unset."""
        unset = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        return replace(self, **unset)


@dataclass
class Rule:
    name: str  # the select_reason it gives
    threshold: str
    keep: Callable[[dict[str, np.ndarray]], np.ndarray]  # columns -> bool mask of rows kept
    detail: Callable[[dict[str, np.ndarray], int], str]


def build_rules(config: SelectConfig, clip_cut: float | None) -> list[Rule]:
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
        rules.append(_threshold("clip_not_top_percent", "score_clip", ">=", clip_cut))
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
    return rules


def _threshold(name: str, column: str, op: str, value: float) -> Rule:
    compare = {">=": np.greater_equal, "<": np.less}[op]

    def keep(cols: dict[str, np.ndarray]) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return compare(cols[column], value)  # NaN (missing score) compares False: dropped

    def detail(cols: dict[str, np.ndarray], row: int) -> str:
        failed = {">=": "<", "<": ">="}[op]
        return f"{column}={cols[column][row]:.4g} {failed} {value:.4g}"

    return Rule(name, f"{column} {op} {value:g}", keep, detail)


def ascii_letter_fraction(caption: str | None) -> float:
    letters = [ch for ch in caption or "" if ch.isalpha()]
    return sum(ch.isascii() for ch in letters) / len(letters) if letters else 0.0


def clip_top_percent_cut(score_files: list[Path], percent: float) -> float:
    """The CLIP score of the last row inside the top `percent` of the scored pool."""
    values = []
    for path in score_files:
        table = pq.read_table(path, columns=["score_clip", "score_reason"])
        table = table.filter(pc.is_null(table["score_reason"]))
        values.append(table["score_clip"].to_numpy(zero_copy_only=False))
    pool = np.sort(np.concatenate(values) if values else np.zeros(0))[::-1]
    pool = pool[~np.isnan(pool)]
    if pool.size == 0:
        return math.inf
    return float(pool[max(math.ceil(pool.size * percent / 100.0), 1) - 1])


class SelectError(ValueError):
    """A rule that cannot be applied to these scores."""


KEPT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("select_kept", pa.bool_()),
        ("select_reason", pa.string()),
        ("select_detail", pa.string()),
    ]
)


def run_select(run_dir: str | Path, config: SelectConfig) -> ShardManifest:
    """Decide keep/drop for every scored row of RUN_DIR; write RUN_DIR/select (see module doc)."""
    run_dir = Path(run_dir)
    score_files = score_tables(run_dir / "score")
    download_files = [p for p in (run_dir / "download" / f.name for f in score_files) if p.exists()]
    inputs = score_files + download_files
    resolved = config.resolved()
    fingerprint = config_hash(resolved)
    done = completed_manifest(run_dir / "select", "all", fingerprint, inputs)
    if done is not None:
        return done
    cut = None
    if resolved.clip_top_percent is not None:
        cut = clip_top_percent_cut(score_files, resolved.clip_top_percent)
    rules = build_rules(resolved, cut)
    check_scores_present(rules, score_files)  # before anything is replaced
    manifest = ShardManifest(stage="select", shard="all", config_hash=fingerprint)
    tally = _Tally(rules)
    with shard_outputs(run_dir / "select", manifest, inputs) as outputs:
        with pq.ParquetWriter(outputs.path("kept.parquet"), KEPT_SCHEMA) as writer:
            for score_file in score_files:
                captions = run_dir / "download" / score_file.name if resolved.english_like else None
                columns = read_columns(score_file, captions)
                writer.write_table(decide(rules, columns, tally))
        pq.write_table(tally.rules_table(), outputs.path("rules.parquet"))
        manifest.rows_in = tally.rows
        manifest.reasons = dict(tally.removed_by_reason())
        manifest.rows_out = tally.rows - sum(manifest.reasons.values())
    return manifest


def check_scores_present(rules: list[Rule], score_files: list[Path]) -> None:
    """A rule on a score no row has (no head weights were given) fails instead of dropping all."""
    for column in {r.threshold.split()[0] for r in rules} & {"score_aesthetic", "score_nsfw"}:
        tables = [pq.read_table(path, columns=[column, "score_reason"]) for path in score_files]
        scored = [t.filter(pc.is_null(t["score_reason"])) for t in tables]
        if sum(t.num_rows for t in scored) and all(t[column].null_count == t.num_rows for t in scored):
            raise SelectError(
                f"a select rule needs {column}, but no scored row has it: run the score stage "
                "with the matching head weights (score.aesthetic_weights / score.nsfw_weights), "
                "or unset the rule"
            )


def score_tables(score_dir: Path) -> list[Path]:
    """The score stage's completed shard tables, in shard order."""
    tables = []
    for shard in manifest_shards(score_dir):
        table = Path(score_dir) / f"{shard}.parquet"
        if table.exists():
            tables.append(table)
    return tables


def read_columns(score_file: Path, download_file: Path | None) -> dict[str, np.ndarray]:
    """The columns the rules look at, for the rows the score stage kept."""
    table = pq.read_table(score_file, columns=SCORE_COLUMNS)
    table = table.filter(pc.is_null(table["score_reason"]))
    cols = {name: table[name].to_numpy(zero_copy_only=False) for name in SCORE_COLUMNS}
    cols = {k: (v if k in ("uid", "score_reason") else v.astype(np.float64)) for k, v in cols.items()}
    width, height = cols["score_width"], cols["score_height"]
    cols["min_side"] = np.minimum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["max_aspect"] = np.maximum(width / height, height / width)
    if download_file is not None:
        download = pq.read_table(download_file, columns=["uid", "caption"]).to_pydict()
        caption_of = dict(zip(download["uid"], download["caption"], strict=True))
        cols["ascii_letter_fraction"] = np.array(
            [ascii_letter_fraction(caption_of.get(uid)) for uid in cols["uid"]], dtype=np.float64
        )
    return cols


def decide(rules: list[Rule], cols: dict[str, np.ndarray], tally: _Tally) -> pa.Table:
    """Keep/drop each row; a dropped row names the first rule it failed."""
    rows = len(cols["uid"])
    reasons: list[str | None] = [None] * rows
    details: list[str | None] = [None] * rows
    for index, rule in enumerate(rules):
        fails = ~rule.keep(cols)
        tally.record(index, fails)
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


class _Tally:
    """Counts per rule across shards."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.rows = 0
        self.removed = [0] * len(rules)
        self.failed = [0] * len(rules)

    def record(self, index: int, fails: np.ndarray) -> None:
        self.failed[index] += int(fails.sum())

    def removed_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rule, count in zip(self.rules, self.removed, strict=True):
            if count:
                out[rule.name] = out.get(rule.name, 0) + count
        return out

    def rules_table(self) -> pa.Table:
        return pa.table(
            {
                "rule": [r.name for r in self.rules],
                "threshold": [r.threshold for r in self.rules],
                "removed": pa.array(self.removed, pa.int64()),
                "failed": pa.array(self.failed, pa.int64()),
            }
        )


def describe(config: SelectConfig) -> list[str]:
    """The resolved, active settings, for printing."""
    resolved = config.resolved()
    return [f"{f.name} = {getattr(resolved, f.name)}" for f in fields(resolved)
            if getattr(resolved, f.name) is not None]
