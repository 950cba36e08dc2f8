"""Which samples later stages work on: those every upstream decision in the run dir kept.

Decisions are read from what exists, so a run without select or dedup still captions and
encodes its successful downloads: download (`download_status` = success), select
(`select/kept.parquet`: `select_kept`, else a null `select_reason`) and dedup
(`dedup/*.parquet` with `dedup_status` = kept). The digest of those files goes into the
fingerprint of the stages that use them, so a changed decision redoes their shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.manifest import manifest_shards, sha256_file
from pipeline.core.stage import ShardSpec


def decision_files(run_dir: Path) -> dict[str, list[Path]]:
    """The upstream decision tables present in a run dir, by stage."""
    run_dir = Path(run_dir)
    found = {
        "download": sorted((run_dir / "download").glob("*.parquet")),
        "select": [p for p in [run_dir / "select" / "kept.parquet"] if p.exists()],
        "dedup": [p for p in sorted((run_dir / "dedup").glob("*.parquet")) if _has(p, "dedup_status")],
    }
    return {stage: paths for stage, paths in found.items() if paths}


def kept_uids(run_dir: Path) -> set[str]:
    """uids that every decision present in `run_dir` kept (an empty run keeps nothing)."""
    files = decision_files(run_dir)
    kept: set[str] | None = None
    for stage, paths in files.items():
        stage_kept: set[str] = set()
        for path in paths:
            stage_kept |= _kept_in(stage, path)
        kept = stage_kept if kept is None else kept & stage_kept
    return kept or set()


def decisions_digest(run_dir: Path) -> str:
    """A short sha256 over the decision files' contents: changes when any decision changes."""
    digest = hashlib.sha256()
    for stage, paths in sorted(decision_files(run_dir).items()):
        for path in paths:
            digest.update(f"{stage}/{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]


def download_shards(run_dir: Path) -> list[ShardSpec]:
    """One unit of work per completed download shard (manifest, tar and parquet present)."""
    download_dir = Path(run_dir) / "download"
    shards = []
    for shard in manifest_shards(download_dir):
        table, tar = download_dir / f"{shard}.parquet", download_dir / f"{shard}.tar"
        if table.exists() and tar.exists():
            shards.append(ShardSpec(shard, {"table": table, "tar": tar}))
    return shards


def iter_kept_rows(
    table_path: Path, kept: set[str] | pa.Array, batch_size: int, columns: list[str]
) -> Iterator[pa.Table]:
    """Batches of a download shard's rows whose uid is kept, in shard order.

    Pass `kept` as a pyarrow array (`pa.array(sorted(kept_uids(...)))`, built once per worker):
    converting a set of millions of uids for every shard would cost seconds each time.
    """
    parquet = pq.ParquetFile(table_path)
    value_set = kept if isinstance(kept, pa.Array) else pa.array(list(kept), pa.string())
    for record_batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        batch = pa.Table.from_batches([record_batch])
        mask = pc.is_in(batch["uid"], value_set=value_set)
        batch = batch.filter(mask)
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


def _has(path: Path, column: str) -> bool:
    return column in pq.read_schema(path).names


def _kept_in(stage: str, path: Path) -> set[str]:
    schema = pq.read_schema(path).names
    if stage == "download":
        table = pq.read_table(path, columns=["uid", "download_status"])
        mask = pc.equal(table["download_status"], "success")
    elif stage == "select" and "select_kept" in schema:
        table = pq.read_table(path, columns=["uid", "select_kept"])
        mask = table["select_kept"]
    elif stage == "select":
        table = pq.read_table(path, columns=["uid", "select_reason"])
        mask = pc.is_null(table["select_reason"])
    else:
        table = pq.read_table(path, columns=["uid", "dedup_status"])
        mask = pc.equal(table["dedup_status"], "kept")
    return set(table.filter(pc.fill_null(mask, False))["uid"].to_pylist())
