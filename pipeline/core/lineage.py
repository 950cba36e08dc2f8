"""Shard lineage: which upstream files stage shard k reads, their checksums, and its kept rows.

Shard k of every stage derives from download shard k and reads only the tables of shard k:
`download/k.parquet` (+ `k.tar`), `score/k.parquet`, `select/k.parquet`, `dedup/k.parquet`,
`caption/k.parquet`. The checksums of those files are the ones their stages' manifests
recorded (dedup's one manifest lists every `k.parquet`), so a shard's inputs are known from
manifests alone; they go into the shard's manifest, and a change upstream redoes exactly its
descendants.

"Kept" for shard k is a per-shard join of the decision columns: `download_status` =
"success", `select_kept` true, `dedup_status` = "kept". A stage absent from the run (no
manifests in its folder) is not applied; a stage that ran but has no table for shard k makes
shard k not ready: it is reported (`NotReady`), never treated as kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.command import InputError
from pipeline.core.manifest import manifest_shards, read_manifests
from pipeline.core.stage import ShardSpec

DOWNLOAD = "download"
# The decision stages and what "kept" means in each one's table.
DECISIONS: dict[str, Callable[[pa.Table], pa.Array]] = {
    "select": lambda t: t["select_kept"],
    "dedup": lambda t: pc.equal(t["dedup_status"], "kept"),
}
DECISION_COLUMNS = {"select": "select_kept", "dedup": "dedup_status"}


class NotReady(InputError):
    """Some shards cannot run yet: an upstream stage ran but has no table for them."""


def recorded_outputs(stage_dir: Path) -> dict[str, str] | None:
    """file name -> sha256 over every manifest of a stage folder; None: the stage did not run."""
    if not manifest_shards(stage_dir):
        return None
    recorded: dict[str, str] = {}
    for manifest in read_manifests(stage_dir):
        recorded.update(manifest.outputs)
    return recorded


@dataclass
class LineagePlan:
    """The shards that can run, and those that cannot yet (upstream stage -> shard ids)."""

    shards: list[ShardSpec]
    missing: dict[str, list[str]] = field(default_factory=dict)

    def not_ready(self, stage: str) -> NotReady | None:
        """The error naming what is missing (count and first ids), or None when all are ready."""
        if not self.missing:
            return None
        shards = sorted({s for ids in self.missing.values() for s in ids})
        parts = [
            f"{name} ran but has no table for {len(ids)} of them "
            f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
            for name, ids in sorted(self.missing.items())
        ]
        return NotReady(
            f"{stage}: {len(shards)} shard(s) not ready and not run: {'; '.join(parts)}. "
            f"Finish those stages for every shard (e.g. `rectiflow {min(self.missing)} RUN_DIR`), "
            f"then rerun {stage}: the shards already done are kept"
        )


def plan_lineage(run_dir: Path, reads: Sequence[str] = ()) -> LineagePlan:
    """One ShardSpec per completed download shard k, with k's tables of the `reads` stages.

    Inputs by role: "table" and "tar" (download k), then one per stage read ("select" ->
    select/k.parquet, ...); checksums "stage/file" -> the sha256 its manifest recorded.
    """
    run_dir = Path(run_dir)
    download = recorded_outputs(run_dir / DOWNLOAD) or {}
    upstream = {stage: recorded_outputs(run_dir / stage) for stage in reads}
    plan = LineagePlan([])
    for shard in manifest_shards(run_dir / DOWNLOAD):
        table, tar = f"{shard}.parquet", f"{shard}.tar"
        if table not in download or tar not in download:
            continue  # not a download shard (e.g. a failed one's leftovers)
        spec = ShardSpec(
            shard,
            {"table": run_dir / DOWNLOAD / table, "tar": run_dir / DOWNLOAD / tar},
            {f"{DOWNLOAD}/{table}": download[table], f"{DOWNLOAD}/{tar}": download[tar]},
        )
        lacking = [
            stage
            for stage, outputs in upstream.items()
            if outputs is not None and table not in outputs
        ]
        for stage in lacking:
            plan.missing.setdefault(stage, []).append(shard)
        if lacking:
            continue
        for stage, outputs in upstream.items():
            if outputs is not None:  # absent stages are not applied
                spec.inputs[stage] = run_dir / stage / table
                spec.checksums[f"{stage}/{table}"] = outputs[table]
        plan.shards.append(spec)
    return plan


def download_shards(run_dir: Path) -> list[ShardSpec]:
    """One unit of work per completed download shard, reading only download k."""
    return plan_lineage(run_dir).shards


def kept_mask(shard: ShardSpec) -> pa.BooleanArray:
    """Per row of download k's table: kept by every decision stage shard k reads."""
    download = pq.read_table(shard.inputs["table"], columns=["uid", "download_status"])
    uids = download["uid"]
    mask = pc.fill_null(pc.equal(download["download_status"], "success"), False)
    for stage, kept in DECISIONS.items():
        if stage in shard.inputs:
            path = shard.inputs[stage]
            table = _read_decisions(path, ["uid", DECISION_COLUMNS[stage]])
            keep = table.filter(pc.fill_null(kept(table), False))["uid"]
            mask = pc.and_(mask, pc.is_in(uids, value_set=keep.combine_chunks()))
    return mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask


def iter_kept_rows(shard: ShardSpec, batch_size: int, columns: list[str]) -> Iterator[pa.Table]:
    """Batches of download k's rows that shard k keeps, in shard order.

    The mask is built once per shard from k's own tables, so filtering a batch costs the
    same whatever the size of the run.
    """
    mask = kept_mask(shard)
    parquet = pq.ParquetFile(shard.inputs["table"])
    offset = 0
    for record_batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        batch = pa.Table.from_batches([record_batch])
        batch = batch.filter(mask.slice(offset, batch.num_rows))
        offset += record_batch.num_rows
        if batch.num_rows:
            yield batch


def decode_ahead(
    batches: Iterator[pa.Table], decode: Callable[[bytes | None], Any], pool: ThreadPoolExecutor
) -> Iterator[tuple[pa.Table, list]]:
    """Each batch (its "image" column decoded by `decode` in `pool`) while the next decodes.

    Pillow releases the GIL while decoding and resizing, so on a model stage the forward pass,
    not the decoding, sets the pace.
    """
    pending: tuple[pa.Table, list[Future]] | None = None
    for batch in batches:
        futures = [pool.submit(decode, data) for data in batch["image"].to_pylist()]
        if pending is not None:
            yield pending[0].drop_columns(["image"]), [f.result() for f in pending[1]]
        pending = (batch, futures)
    if pending is not None:
        yield pending[0].drop_columns(["image"]), [f.result() for f in pending[1]]


def _read_decisions(path: Path, columns: list[str]) -> pa.Table:
    names = pq.read_schema(path).names
    absent = [c for c in columns if c not in names]
    if absent:
        raise InputError(f"{path} has no column {absent[0]!r} (columns: {', '.join(names)})")
    return pq.read_table(path, columns=columns)
