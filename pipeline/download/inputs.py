"""URL lists (Parquet, CSV, JSONL) streamed into input shards with stable uids.

Shards are cut in input order, `rows_per_shard` rows each, so shard ids and uids are the same
on every rerun of the same list, and each input shard is rewritten only if its content
changed (so completed shards' manifests stay valid). Rows that cannot be fetched at all are
marked here with a reason and still travel through the shard, so every input row gets an
output row: a repeated uid (`duplicate_uid`, first occurrence wins) or no URL (`missing_url`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core import reasons
from pipeline.core.command import InputError
from pipeline.core.manifest import sha256_file
from pipeline.core.uids import uid_for

if TYPE_CHECKING:
    from pipeline.download.stage import DownloadConfig

_READ_BATCH = 65_536


def cut_input_shards(urls: Path, inputs_dir: Path, config: DownloadConfig) -> list[tuple[str, Path]]:
    """Write `inputs_dir/NNNNN.parquet` shards; return [(shard id, path)] in order."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    # 8-byte uid digests: duplicate detection costs ~70 bytes per input row, not the uids.
    seen: set[int] = set()
    shards, pending, pending_rows = [], [], 0
    for batch in read_url_batches(urls, config):
        pending.append(_with_uids(batch, config, seen))
        pending_rows += batch.num_rows
        while pending_rows >= config.rows_per_shard:
            table = pa.concat_tables(pending, promote_options="permissive")
            shards.append(_write_shard(table.slice(0, config.rows_per_shard), inputs_dir, len(shards)))
            rest = table.slice(config.rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        table = pa.concat_tables(pending, promote_options="permissive")
        shards.append(_write_shard(table, inputs_dir, len(shards)))
    return shards


def read_url_batches(path: Path, config: DownloadConfig) -> Iterator[pa.Table]:
    """Stream the URL list in batches, whatever its format."""
    fmt = config.input_format if config.input_format != "auto" else _detect_format(path)
    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_BATCH):
            yield pa.Table.from_batches([batch])
    elif fmt == "csv":
        with open(path, encoding="utf-8") as f:
            header = next(csv.reader([f.readline()]))
        types = {name: pa.string() for name in header}  # no type guessing per block
        reader = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
        for batch in reader:
            yield pa.Table.from_batches([batch])
    else:
        yield from _read_jsonl(path)


def _detect_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"),
                        (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise InputError(f"cannot tell the format of {path}; set download.input_format")


def _read_jsonl(path: Path) -> Iterator[pa.Table]:
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_number}: not JSON: {e}") from e
            if len(rows) == _READ_BATCH:
                yield pa.Table.from_pylist(rows)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows)


def _with_uids(batch: pa.Table, config: DownloadConfig, seen: set[int]) -> pa.Table:
    """The shard's columns: uid, url, caption, passthrough columns, and a pre-fetch reason."""
    if config.url_column not in batch.column_names:
        raise InputError(f"URL list has no column {config.url_column!r}: {batch.column_names}")
    urls = batch.column(config.url_column).to_pylist()
    captions = _column_or_nulls(batch, config.caption_column)
    ids = _column_or_nulls(batch, config.id_column)
    uids, early = [], []
    for url, caption, given in zip(urls, captions, ids, strict=True):
        uid = uid_for(url or "", caption, given)
        digest = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")
        early.append(reasons.MISSING_URL if not url else
                     reasons.DUPLICATE_UID if digest in seen else None)
        seen.add(digest)
        uids.append(uid)
    columns = {"uid": pa.array(uids, pa.string()), "url": pa.array(urls, pa.string()),
               "caption": pa.array([None if c is None else str(c) for c in captions], pa.string())}
    for name in _passthrough(batch, config):
        columns[name] = batch.column(name)
    columns["download_reason_in"] = pa.array(early, pa.string())
    return pa.table(columns)


def _column_or_nulls(batch: pa.Table, name: str) -> list:
    if name in batch.column_names:
        return batch.column(name).to_pylist()
    return [None] * batch.num_rows


def _passthrough(batch: pa.Table, config: DownloadConfig) -> list[str]:
    reserved = {config.url_column, config.caption_column, config.id_column, "uid", "url",
                "caption", "download_reason_in"}
    wanted = config.passthrough_columns
    names = batch.column_names if wanted is None else [n for n in wanted if n in batch.column_names]
    return [n for n in names if n not in reserved and not n.startswith("download_")]


def _write_shard(table: pa.Table, inputs_dir: Path, index: int) -> tuple[str, Path]:
    shard = f"{index:05d}"
    final = inputs_dir / f"{shard}.parquet"
    tmp = inputs_dir / f".{shard}.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    if final.exists() and sha256_file(final) == sha256_file(tmp):
        tmp.unlink()  # unchanged: keep the file its manifest was checked against
    else:
        os.replace(tmp, final)
    return shard, final
