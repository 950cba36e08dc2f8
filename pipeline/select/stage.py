"""The select step: a query over the scores that names which samples to keep. Nothing is deleted.

Per score shard k, select reads `score/k.parquet` (the rows the score stage scored,
`score_reason` null; rows it dropped are explained there) and, only for the English-like rule
and the column rules, `download/k.parquet` (captions; a list's passthrough columns such as
LAION's `punsafe`, read as `download.NAME`); it applies the rules (pipeline/select/rules.py) and writes
- `select/k.parquet`: uid, select_kept, select_reason (the first rule that failed, null when
  kept), select_detail (the value and the threshold, e.g. "score_nsfw=0.91 >= 0.5");
- `select/k.manifest.json`: rows in and out, reasons, and in `extra` the per-rule counts;
then the driver writes `select/rules.parquet` (per rule: threshold, removed, failed, note),
summed from the shard manifests, not from the tables. The one run-wide number, the
`clip_top_percent` cut, comes from per-shard histograms (pipeline/select/sketch.py), not from
a sort of the whole pool.

A shard's fingerprint is the resolved config, the cut and the checksums that the score (and
download) manifests recorded for the tables it reads: a rerun with nothing changed redoes
nothing, a changed score shard redoes its select shard, and every shard is redone only when
the cut moved. Select is cheap per row, so it runs on the driver one shard at a time, holding
one shard's rows at most.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import config_to_dict
from pipeline.core.lineage import recorded_outputs
from pipeline.core.manifest import (
    ShardManifest,
    completed_manifest,
    manifest_path,
    manifest_shards,
    read_manifest,
    remove_stale_temporaries,
    shard_outputs,
)
from pipeline.select.config import PRESETS, SelectConfig, SelectError, describe
from pipeline.select.rules import (
    Rule,
    Tally,
    build_rules,
    check_scores_present,
    check_upstream_columns,
    decide,
    read_columns,
    upstream_columns,
)
from pipeline.select.sketch import SKETCH_DIR, ClipCut, pool_sketch

__all__ = ["PRESETS", "SelectConfig", "SelectError", "SelectRun", "describe", "run_select"]
RULES_TABLE = "rules.parquet"


@dataclass(frozen=True)
class SelectShard:
    """One select shard: the upstream tables it reads and their recorded checksums."""

    shard: str
    score: Path
    # "score/k.parquet" (and "download/k.parquet") -> the sha256 its manifest recorded: the
    # shard manifest's `inputs`, so deciding what is done reads no table.
    upstream: dict[str, str]
    download: Path | None = None  # read only for captions (English-like) and column rules


@dataclass
class SelectRun:
    """What a select run left: every shard's manifest, which ones it redid, the merged rules."""

    shards: dict[str, ShardManifest]
    redone: list[str]
    rules: pa.Table
    cut: ClipCut | None = None
    reasons: dict[str, int] = field(init=False)

    def __post_init__(self):
        reasons: dict[str, int] = {}
        for m in self.shards.values():
            for reason, count in m.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        self.reasons = reasons

    @property
    def rows_in(self) -> int:
        return sum(m.rows_in for m in self.shards.values())

    @property
    def rows_out(self) -> int:
        return sum(m.rows_out for m in self.shards.values())


def run_select(run_dir: str | Path, config: SelectConfig, progress: bool = True,
               verify: bool = False) -> SelectRun:
    """Decide keep/drop for every scored row of RUN_DIR, shard by shard (see module doc).

    `verify`: a done shard also needs its outputs to match their recorded sha256, not only
    their sizes.
    """
    run_dir = Path(run_dir)
    select_dir = run_dir / "select"
    resolved = config.resolved()
    shards = plan_shards(run_dir, resolved.needs_download())
    select_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(select_dir)  # a killed run's half-written files
    cut = None
    if resolved.clip_top_percent is not None:
        sources = [(s.shard, s.score, s.upstream[f"score/{s.score.name}"]) for s in shards]
        cut = pool_sketch(select_dir, sources).cut(resolved.clip_top_percent)
    rules = build_rules(resolved, cut)
    key = decision_key(resolved, cut)
    manifests: dict[str, ShardManifest] = {}
    todo = []
    for s in shards:
        done = completed_manifest(select_dir, s.shard, fingerprint(key, s), s.upstream,
                                  verify=verify)
        if done is None:
            todo.append(s)
        else:
            manifests[s.shard] = done
    for s in todo:  # before anything is replaced
        check_scores_present(rules, s.score)
        check_upstream_columns(rules, s.download)
    for s in tqdm(todo, desc="select", unit="shard", disable=not progress):
        manifests[s.shard] = select_shard(select_dir, s, rules, fingerprint(key, s))
    remove_orphans(select_dir, {s.shard for s in shards})
    manifests = dict(sorted(manifests.items()))
    return SelectRun(manifests, [s.shard for s in todo], write_rules(select_dir, rules, manifests, cut), cut)


def plan_shards(run_dir: Path, needs_download: bool) -> list[SelectShard]:
    """One select shard per completed score shard, with the checksums its inputs were recorded at."""
    score_dir, download_dir = run_dir / "score", run_dir / "download"
    scores = recorded_outputs(score_dir) or {}
    downloads = (recorded_outputs(download_dir) or {}) if needs_download else {}
    shards = []
    for shard in manifest_shards(score_dir):
        name = f"{shard}.parquet"
        if name not in scores:
            continue  # not a score shard's manifest
        upstream = {f"score/{name}": scores[name]}
        download = None
        if needs_download:
            download = download_dir / name
            if name not in downloads or not download.exists():
                raise SelectError(f"the english_like and column rules read {download}, "
                                  "which no completed download shard wrote")
            upstream[f"download/{name}"] = downloads[name]
        shards.append(SelectShard(shard, score_dir / name, upstream, download))
    return shards


def decision_key(config: SelectConfig, cut: ClipCut | None) -> str:
    """What decides every select shard alike: the resolved rules and the cut (made once per
    run, not per shard: a no-op rerun's cost is mostly this bookkeeping)."""
    data = {"select": config_to_dict(config), "clip_cut": None if cut is None else repr(cut.value)}
    return json.dumps(data, sort_keys=True)


def fingerprint(key: str, shard: SelectShard) -> str:
    """What decides a select shard: `decision_key` and its inputs' recorded checksums."""
    upstream = json.dumps(shard.upstream, sort_keys=True)
    return hashlib.sha256(f"{key}\n{upstream}".encode()).hexdigest()[:16]


def select_shard(select_dir: Path, shard: SelectShard, rules: list[Rule], fingerprint: str) -> ShardManifest:
    """Write select/k.parquet and its manifest (per-rule counts in `extra`)."""
    manifest = ShardManifest(stage="select", shard=shard.shard, config_hash=fingerprint)
    tally = Tally(rules)
    with shard_outputs(select_dir, manifest, shard.upstream) as outputs:
        cols = read_columns(shard.score, shard.download, upstream_columns(rules))
        table = decide(rules, cols, tally)
        pq.write_table(table, outputs.path(f"{shard.shard}.parquet"))
        manifest.rows_in = tally.rows
        manifest.reasons = tally.removed_by_reason()
        manifest.rows_out = tally.rows - sum(manifest.reasons.values())
        manifest.extra = {"rules": tally.to_json()}
    return manifest


def remove_orphans(select_dir: Path, current: set[str]) -> None:
    """Drop select shards (and sketches) whose score shard is gone, e.g. the old `all` shard."""
    for shard in manifest_shards(select_dir):
        if shard in current:
            continue
        manifest = read_manifest(select_dir, shard)
        outputs = list(manifest.outputs) if manifest else []
        manifest_path(select_dir, shard).unlink()  # first: a manifest must never vouch for files being removed
        for name in [*outputs, f"{shard}.parquet"]:
            (select_dir / name).unlink(missing_ok=True)
    for sketch in sorted((select_dir / SKETCH_DIR).glob("*.json")):
        if sketch.stem not in current and not sketch.name.startswith("_"):  # _pool.json stays
            sketch.unlink()


def write_rules(select_dir: Path, rules: list[Rule], manifests: dict[str, ShardManifest],
                cut: ClipCut | None) -> pa.Table:
    """select/rules.parquet, summed from the shard manifests' per-rule counts."""
    total = Tally(rules)
    for m in manifests.values():
        total.add_json(m.extra.get("rules", []), manifest_path(select_dir, m.shard))
        total.rows += m.rows_in
    table = total.rules_table({"clip_not_top_percent": cut.note()} if cut else None)
    final = select_dir / RULES_TABLE
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return table
