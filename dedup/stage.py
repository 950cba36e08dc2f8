"""The dedup step of a curation run: exact -> perceptual -> semantic over Parquet columns.

Dedup compares every sample with every other, so unlike the per-shard stages it runs once
over all of the score stage's tables. It writes one output table per input table (uid and
the `dedup_` columns; in a run, `dedup/k.parquet` for score shard k), the threshold sweep,
and one manifest `dedup/dedup.manifest.json` whose `outputs` give each table's sha256 (what
the per-shard stages downstream record). A rerun whose config and inputs match the manifest
does nothing; in a run the inputs are the checksums the score, download and select manifests
recorded (dedup/run_inputs.py), so that check re-hashes nothing. Each method sees only the
samples the previous ones kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.config import DedupConfig
from dedup.exact import exact_labels
from dedup.inputs import DedupInputs, list_inputs, read_inputs
from dedup.pairs import Pairs
from dedup.perceptual import colour_confirmed, phash_pairs
from dedup.representatives import (
    Decisions,
    group_roots,
    priority_rank,
    resolve_labels,
    resolve_pairs,
)
from dedup.run_inputs import RunLineage, read_run_sources, run_lineage
from dedup.semantic import SemanticDeduplicator, TileRunner, run_tiles_locally
from dedup.sweep import SWEEP_PLOT, SWEEP_TABLE, SweepPoint, sweep, write_sweep
from pipeline.core.command import InputError
from pipeline.core.config import config_hash
from pipeline.core.manifest import Inputs, ShardManifest, completed_manifest, shard_outputs
from pipeline.core.run_lock import run_lock

STAGE = "dedup"
REASONS = {
    "exact": "exact_duplicate",
    "perceptual": "perceptual_duplicate",
    "semantic": "near_duplicate",
}
OUTPUT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("dedup_group", pa.string()),
        ("dedup_representative", pa.string()),
        ("dedup_method", pa.string()),
        ("dedup_similarity", pa.float32()),
        ("dedup_status", pa.string()),
        ("dedup_reason", pa.string()),
    ]
)


@dataclass
class DedupOutcome:
    decisions: Decisions
    method: np.ndarray  # (N,) object: which method dropped the row, None if kept
    sweep: list[SweepPoint] | None

    def __post_init__(self):
        self.roots = group_roots(self.decisions.representative)  # (N,) each row's kept row


@dataclass
class DedupRun:
    manifest: ShardManifest
    ran: bool  # False: an up-to-date output was already there


def deduplicate(
    config: DedupConfig, inputs: DedupInputs, run_tiles: TileRunner = run_tiles_locally
) -> DedupOutcome:
    """Decisions for every row; rows that are not `active` take no part."""
    n = len(inputs.uids)
    rank = priority_rank(inputs.score, n)
    decisions = Decisions.all_kept(n)
    method = np.full(n, None, object)

    def record(name: str, before: np.ndarray) -> None:
        method[decisions.dropped & ~before] = name

    if inputs.sha256 is not None:
        labels = exact_labels(inputs.sha256)
        labels[~inputs.active] = -1 - np.flatnonzero(~inputs.active)  # never equal to any other
        before = decisions.dropped
        resolve_labels(labels, rank, decisions)
        record("exact", before)
    if inputs.phash is not None:
        rows = np.flatnonzero(inputs.active & inputs.has_phash & ~decisions.dropped)
        pairs = _perceptual_pairs(config, inputs, rows)
        before = decisions.dropped
        resolve_pairs(pairs, rank, decisions)
        record("perceptual", before)
    points = None
    if config.semantic and inputs.embeddings is not None:
        rows = np.flatnonzero(inputs.active & inputs.has_embedding & ~decisions.dropped)
        pairs, points = _semantic_pairs(config, inputs.embeddings, rows, rank, decisions, run_tiles)
        before = decisions.dropped
        resolve_pairs(pairs.at_least(config.semantic_threshold), rank, decisions)
        record("semantic", before)
    return DedupOutcome(decisions, method, points)


def _perceptual_pairs(config: DedupConfig, inputs: DedupInputs, rows: np.ndarray) -> Pairs:
    """pHash pairs among `rows` (full-table indices), confirmed by colour layout where both
    images have a descriptor; a pair's similarity stays 1 - distance / 64."""
    pairs = phash_pairs(inputs.phash[rows], config.phash_max_distance, config.phash_index)
    pairs = pairs.restricted_to(rows)
    if not config.colour_check or inputs.colour is None:  # pHashes from a column: no colour
        return pairs
    return colour_confirmed(pairs, inputs.colour, inputs.has_colour, config.colour_min_similarity)


def _semantic_pairs(config, embeddings, rows, rank, decisions, run_tiles):
    """Search once at the lowest threshold wanted; the sweep filters that one set of pairs."""
    thresholds = list(config.sweep_thresholds) if config.sweep else []
    lowest = min([config.semantic_threshold, *thresholds])
    finder = SemanticDeduplicator(config)
    pairs = finder.find_pairs(embeddings, rows, lowest, run_tiles)
    if not thresholds:
        return pairs, None
    base = Decisions(decisions.representative.copy(), decisions.similarity.copy())
    return pairs, sweep(pairs, rank, thresholds, base, considered=len(rows))


def output_table(inputs: DedupInputs, outcome: DedupOutcome, rows: slice) -> pa.Table:
    """The `dedup_` columns of one input file's rows."""
    uids = inputs.uids
    rep = outcome.decisions.representative[rows]
    dropped = rep >= 0
    active = inputs.active[rows]
    own = np.arange(len(uids))[rows]
    root = outcome.roots[rows]
    methods = outcome.method[rows]
    sim = outcome.decisions.similarity[rows]

    def where_active(values):
        return [v if a else None for v, a in zip(values, active, strict=True)]

    return pa.table(
        {
            "uid": uids[rows].tolist(),
            "dedup_group": where_active(uids[root].tolist()),
            "dedup_representative": where_active(uids[np.where(dropped, rep, own)].tolist()),
            "dedup_method": methods.tolist(),
            "dedup_similarity": pa.array(np.where(dropped, sim, np.nan), pa.float32(),
                                         mask=~dropped),
            "dedup_status": where_active(np.where(dropped, "dropped", "kept").tolist()),
            "dedup_reason": [REASONS.get(m) for m in methods.tolist()],
        },
        schema=OUTPUT_SCHEMA,
    )  # fmt: skip


def run_dedup_for_run(
    config: DedupConfig, run_dir: Path, force: bool = False, verify: bool = False
) -> DedupRun:
    """The curation step: RUN_DIR/score (+ download hashes, select decisions) -> RUN_DIR/dedup."""
    run_dir = Path(run_dir)
    lineage = run_lineage(run_dir)  # from manifests: which tables, and their checksums
    with run_lock(run_dir):
        return _dedup(config, lineage.score_tables, run_dir / STAGE, lineage.inputs, force,
                      verify, lineage)


def run_dedup(
    config: DedupConfig, input_dir: Path, out_dir: Path, force: bool = False, verify: bool = False
) -> DedupRun:
    """Deduplicate every table in `input_dir` (any folder of tables) into `out_dir`, unless
    already done; with no manifests to vouch for them, the tables are hashed."""
    files = list_inputs(input_dir)
    if not files:
        raise InputError(f"no Parquet tables in {input_dir}")
    return _dedup(config, files, Path(out_dir), files, force, verify)


def _dedup(config: DedupConfig, files: list[Path], out_dir: Path, checked: Inputs, force: bool,
           verify: bool, lineage: RunLineage | None = None) -> DedupRun:
    """Deduplicate `files` into `out_dir` unless its manifest is current for `checked`;
    with a run's `lineage`, hashes the tables lack and select's decisions come from the run."""
    fingerprint = config_hash(_decisions_only(config))
    done = None if force else completed_manifest(out_dir, STAGE, fingerprint, checked, verify)
    if done is not None:
        return DedupRun(done, ran=False)
    manifest = ShardManifest(stage=STAGE, shard=STAGE, config_hash=fingerprint)
    with shard_outputs(Path(out_dir), manifest, checked) as outputs:
        sources = _run_sources(config, files, lineage) if lineage else None
        inputs = read_inputs(config, files, sources)
        outcome = deduplicate(config, inputs, _tile_runner(config))
        start = 0
        for path, count in zip(files, inputs.file_rows, strict=True):
            table = output_table(inputs, outcome, slice(start, start + count))
            pq.write_table(table, outputs.path(f"{path.stem}.parquet"))
            start += count
        if outcome.sweep:
            label = f"({config.semantic_mode})"
            write_sweep(outcome.sweep, outputs.path(SWEEP_TABLE), outputs.path(SWEEP_PLOT), label)
        else:  # a sweep from an earlier config would no longer describe these outputs
            for name in (SWEEP_TABLE, SWEEP_PLOT):
                (Path(out_dir) / name).unlink(missing_ok=True)
        reasons = Counter(REASONS[m] for m in outcome.method.tolist() if m)
        manifest.reasons = dict(reasons)
        manifest.rows_in = int(inputs.active.sum())
        manifest.rows_out = manifest.rows_in - sum(reasons.values())
    return DedupRun(manifest, ran=True)


def _decisions_only(config: DedupConfig) -> DedupConfig:
    """The config without its execution settings: where and in how many threads the search
    runs does not change a decision (Ray and in-process output are tested equal), so
    switching backend must not redo a finished dedup."""
    defaults = DedupConfig()
    return replace(config, backend=defaults.backend, num_threads=defaults.num_threads,
                   max_task_mb=defaults.max_task_mb, chunk_rows=defaults.chunk_rows)


def _run_sources(config: DedupConfig, files: list[Path], lineage: RunLineage):
    """Hashes from the run, only for what the score tables lack, only for their uids."""
    names = set.intersection(*(set(pq.read_schema(f).names) for f in files))
    has_sha = config.sha256_column in names or config.image_column in names
    has_phash = config.phash_column in names or config.image_column in names
    needed = replace(config, exact=config.exact and not has_sha,
                     perceptual=config.perceptual and not has_phash)  # fmt: skip
    uids = set()
    for f in files:
        uids.update(pq.read_table(f, columns=[config.uid_column]).column(0).to_pylist())
    return read_run_sources(lineage, needed, uids)


def _tile_runner(config: DedupConfig) -> TileRunner:
    if config.backend != "ray":
        return run_tiles_locally
    from dedup.ray_runner import ray_tile_runner  # Ray only when asked for
    from pipeline.core.runners import ensure_ray

    ensure_ray()  # RAY_ADDRESS (a cluster, under `ray job submit`) or an embedded Ray
    return ray_tile_runner(config.max_task_mb)
