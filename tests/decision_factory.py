"""Writes decision-stage outputs in their documented per-shard format (docs/formats.md).

- select: `select/k.parquet` (uid, select_kept, select_reason, select_detail) + `k.manifest.json`;
- dedup: `dedup/k.parquet` per score shard under one manifest `dedup/dedup.manifest.json`;
- caption: `caption/k.parquet` (uid, caption_synthetic, caption_reason) + `k.manifest.json`.
Each is published through the real manifest code, so lineage reads the checksums it records.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.manifest import ShardManifest, shard_outputs

SELECT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("select_kept", pa.bool_()),
        ("select_reason", pa.string()),
        ("select_detail", pa.string()),
    ]
)


def publish(stage_dir: Path, shard: str, tables: dict[str, pa.Table]) -> ShardManifest:
    """Write `tables` (file name -> table) as one shard of a stage, manifest last."""
    manifest = ShardManifest(stage=Path(stage_dir).name, shard=shard, config_hash="factory")
    with shard_outputs(Path(stage_dir), manifest, {}) as outputs:
        for name, table in tables.items():
            pq.write_table(table, outputs.path(name))
        manifest.rows_in = manifest.rows_out = sum(t.num_rows for t in tables.values())
    return manifest


def write_select_shard(run_dir: Path, shard: str, kept: dict[str, bool]) -> ShardManifest:
    """select k: `kept` maps each scored uid of shard k to its decision."""
    table = pa.table({
        "uid": list(kept),
        "select_kept": list(kept.values()),
        "select_reason": [None if k else "clip_min" for k in kept.values()],
        "select_detail": [None if k else "score_clip=0.1 < 0.2" for k in kept.values()],
    }, schema=SELECT_SCHEMA)  # fmt: skip
    return publish(Path(run_dir) / "select", shard, {f"{shard}.parquet": table})


def write_dedup(run_dir: Path, statuses: dict[str, dict[str, str | None]]) -> ShardManifest:
    """dedup: shard -> uid -> dedup_status ("kept", "dropped", None), one manifest for all."""
    tables = {}
    for shard, rows in statuses.items():
        tables[f"{shard}.parquet"] = pa.table({
            "uid": list(rows),
            "dedup_status": pa.array(list(rows.values()), pa.string()),
            "dedup_reason": [("exact_duplicate" if s == "dropped" else None) for s in rows.values()],
        })  # fmt: skip
    return publish(Path(run_dir) / "dedup", "dedup", tables)


def write_caption_shard(
    run_dir: Path, shard: str, synthetic: dict[str, str | None]
) -> ShardManifest:
    """caption k: uid -> accepted synthetic caption (None: rejected, reason `refusal`)."""
    table = pa.table({
        "uid": list(synthetic),
        "caption_synthetic": pa.array(list(synthetic.values()), pa.string()),
        "caption_reason": [None if s else "refusal" for s in synthetic.values()],
    })  # fmt: skip
    return publish(Path(run_dir) / "caption", shard, {f"{shard}.parquet": table})


def scored_uids(run_dir: Path, shard: str) -> list[str]:
    """The uids of download k that downloaded (what score, then select, would see)."""
    table = pq.read_table(
        Path(run_dir) / "download" / f"{shard}.parquet", columns=["uid", "download_status"]
    )
    return [r["uid"] for r in table.to_pylist() if r["download_status"] == "success"]
