"""The stage framework: a stage maps batches of rows to rows; the framework does the rest.

A stage is a small class with no Ray import. It reads its shard's inputs in batches,
`process`es each batch (a pyarrow Table) into rows keyed by `uid` whose columns carry the
stage's prefix, and says why a row is dropped with `<prefix>_reason`. The framework writes
each shard atomically with its manifest, skips shards that are already done, and keeps the
bookkeeping (rows in and out, reason histogram, seconds, model ids). Runners
(`pipeline/core/runners.py`) decide where shards run: in-process for tests, Ray for clusters.

Which shards are done is decided from manifests alone, before `setup` loads any model: so
`fingerprint()` must not need `setup`, and `__init__` must stay cheap (the driver builds one
stage just to ask it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import config_hash
from pipeline.core.manifest import (
    Inputs,
    ShardManifest,
    ShardOutputs,
    completed_manifest,
    shard_outputs,
)


@dataclass
class ShardSpec:
    """One unit of work: a shard id, the input files it reads (by role) and their checksums.

    `checksums` ("download/00000.parquet" -> sha256) are the ones the upstream manifests
    recorded (pipeline/core/lineage.py); without them the input files are hashed.
    """

    shard: str
    inputs: dict[str, Path] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)

    def input_paths(self) -> list[Path]:
        return [Path(p) for _, p in sorted(self.inputs.items())]

    def recorded_inputs(self) -> Inputs:
        """What the shard's manifest records as its inputs, and a rerun compares."""
        return self.checksums or self.input_paths()


class Stage:
    """Base class: subclasses set `name`, implement `process`, and may override the rest."""

    name: ClassVar[str] = ""
    batch_size: int = 256

    def __init__(self, config: Any):
        self.config = config

    @property
    def reason_column(self) -> str:
        return f"{self.name}_reason"

    def setup(self) -> None:
        """Load models once per worker (called before the first shard that is not done)."""

    def models(self) -> dict[str, str]:
        """Model ids and revisions to record in the manifest, by role."""
        return {}

    def fingerprint(self) -> str:
        """The stage's part of what decides whether a shard is current (its inputs' recorded
        checksums are the other part); computed on the driver, without `setup`."""
        return config_hash(self.config)

    def read_batches(self, shard: ShardSpec) -> Iterator[pa.Table]:
        """Default input: one Parquet table, named 'table', streamed in batches."""
        parquet = pq.ParquetFile(shard.inputs["table"])
        for batch in parquet.iter_batches(batch_size=self.batch_size):
            yield pa.Table.from_batches([batch])

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def begin_shard(self, shard: ShardSpec, outputs: ShardOutputs) -> None:
        """Open extra outputs of a shard (e.g. a tar) through `outputs`, committed together."""

    def end_shard(self) -> None:
        """Close what `begin_shard` opened (also called when the shard fails)."""

    def output_schema(self) -> pa.Schema | None:
        """Schema for shards with no rows at all (None: inferred from the first batch)."""
        return None


def shard_done(
    shard: ShardSpec, stage_dir: Path, fingerprint: str, verify: bool = False
) -> ShardManifest | None:
    """The shard's manifest if it is done for this fingerprint and these inputs, else None."""
    return completed_manifest(stage_dir, shard.shard, fingerprint, shard.recorded_inputs(), verify)


def run_shard(
    stage: Stage, shard: ShardSpec, stage_dir: Path, verify: bool = False
) -> tuple[ShardManifest, bool]:
    """Run one shard unless it is already done; return its manifest and whether it ran."""
    fingerprint = stage.fingerprint()
    done = shard_done(shard, stage_dir, fingerprint, verify)
    if done is not None:
        return done, False
    return write_shard(stage, shard, stage_dir, fingerprint), True


def write_shard(stage: Stage, shard: ShardSpec, stage_dir: Path, fingerprint: str) -> ShardManifest:
    """Run one shard (set up stage, not checked for being done) and publish it atomically."""
    stage_dir = Path(stage_dir)
    manifest = ShardManifest(stage=stage.name, shard=shard.shard, config_hash=fingerprint)
    manifest.models = stage.models()
    reasons: Counter[str] = Counter()
    with shard_outputs(stage_dir, manifest, shard.recorded_inputs()) as outputs:
        writer = None
        out_path = outputs.path(f"{shard.shard}.parquet")
        stage.begin_shard(shard, outputs)
        try:
            for batch in stage.read_batches(shard):
                result = stage.process(batch)
                manifest.rows_in += batch.num_rows
                reasons.update(r for r in result.column(stage.reason_column).to_pylist() if r)
                if writer is None:
                    writer = pq.ParquetWriter(out_path, result.schema)
                writer.write_table(result)
            if writer is None:
                schema = stage.output_schema() or pa.schema([("uid", pa.string())])
                writer = pq.ParquetWriter(out_path, schema)
        finally:
            if writer is not None:
                writer.close()
            stage.end_shard()
        manifest.reasons = dict(reasons)
        manifest.rows_out = manifest.rows_in - sum(reasons.values())
    return manifest


def reject(reasons: list[str | None], index: int, reason: str) -> None:
    """Mark row `index` of a batch as dropped, keeping its first reason."""
    if reasons[index] is None:
        reasons[index] = reason
