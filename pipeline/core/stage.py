"""The stage framework: a stage maps batches of rows to rows; the framework does the rest.

A stage is a small class with no Ray import. It reads its shard's inputs in batches,
`process`es each batch (a pyarrow Table) into rows keyed by `uid` whose columns carry the
stage's prefix, and says why a row is dropped with `<prefix>_reason`. The framework writes
each shard atomically with its manifest, skips shards that are already done, and keeps the
bookkeeping (rows in and out, reason histogram, seconds, model ids). Runners
(`pipeline/core/runners.py`) decide where shards run: in-process for tests, Ray for clusters.
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
from pipeline.core.manifest import ShardManifest, ShardOutputs, completed_manifest, shard_outputs


@dataclass
class ShardSpec:
    """One unit of work: a shard id and the input files it reads."""

    shard: str
    inputs: dict[str, Path] = field(default_factory=dict)

    def input_paths(self) -> list[Path]:
        return [Path(p) for _, p in sorted(self.inputs.items())]


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
        """Load models once per worker (called before the first shard)."""

    def models(self) -> dict[str, str]:
        """Model ids and revisions to record in the manifest, by role."""
        return {}

    def fingerprint(self) -> str:
        """What decides whether an existing shard output is still current."""
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


def run_shard(stage: Stage, shard: ShardSpec, stage_dir: Path) -> tuple[ShardManifest, bool]:
    """Run one shard unless it is already done; return its manifest and whether it ran."""
    stage_dir = Path(stage_dir)
    inputs = shard.input_paths()
    fingerprint = stage.fingerprint()
    done = completed_manifest(stage_dir, shard.shard, fingerprint, inputs)
    if done is not None:
        return done, False
    manifest = ShardManifest(stage=stage.name, shard=shard.shard, config_hash=fingerprint)
    manifest.models = stage.models()
    reasons: Counter[str] = Counter()
    with shard_outputs(stage_dir, manifest, inputs) as outputs:
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
    return manifest, True


def reject(reasons: list[str | None], index: int, reason: str) -> None:
    """Mark row `index` of a batch as dropped, keeping its first reason."""
    if reasons[index] is None:
        reasons[index] = reason
