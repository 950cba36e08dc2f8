"""The uid index of a download (`download/_uid_index/BB.parquet`) and the duplicates it finds.

While the URL-list parts are cut (pipeline/download/inputs.py), each part also writes its
uids with their bucket (`pipeline.core.uids.uid_bucket`) and row number to a spill file, one
row group per bucket. This pass then takes the buckets one at a time: a bucket holds every
occurrence of its uids across all parts, so a uid repeated in two parts meets itself here,
while memory stays at about one bucket (1/256 of the run) and nothing per row stays on the
driver. The first occurrence in (part, row) order wins; the later ones are written to a
duplicates file that marks them `duplicate_uid` in their shard.

Index files: columns `uid` (string) and `shard` (string, the download shard id holding the
uid's first occurrence), one row per distinct uid, sorted by uid; every bucket has a file,
empty or not, so a missing file means the index was not built. `rectiflow inspect --uid`
reads one bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.uids import UID_INDEX_BUCKETS, UID_INDEX_DIR, uid_bucket

SPILL_SCHEMA = pa.schema([("uid", pa.string()), ("bucket", pa.uint16()), ("row", pa.int64())])
INDEX_SCHEMA = pa.schema([("uid", pa.string()), ("shard", pa.string())])
DUPLICATES_SCHEMA = pa.schema([("part", pa.int32()), ("row", pa.int64())])
BUCKETS_PER_TASK = 16  # 16 tasks of 16 buckets: each task opens every spill file once


def index_path(stage_dir: str | Path, bucket: int) -> str:
    return storage.join(str(stage_dir), UID_INDEX_DIR, f"{bucket:02x}.parquet")


def buckets_of(uids: list[str]) -> pa.Array:
    return pa.array([uid_bucket(u) for u in uids], pa.uint16())


def write_spill(path: Path, uids: pa.Array, buckets: pa.Array, rows: pa.Array) -> None:
    """One part's uids as one row group per bucket (row group b = bucket b, maybe empty)."""
    table = pa.table([uids, buckets, rows], schema=SPILL_SCHEMA)
    table = table.take(pc.sort_indices(table, [("bucket", "ascending"), ("row", "ascending")]))
    counts = np.bincount(table.column("bucket").to_numpy(), minlength=UID_INDEX_BUCKETS)
    with pq.ParquetWriter(path, SPILL_SCHEMA) as writer:
        start = 0
        for count in counts:
            writer.write_table(table.slice(start, int(count)), row_group_size=max(int(count), 1))
            start += int(count)


@dataclass
class BucketTask:
    """Buckets [first, last) over every part's spill file (in part order)."""

    first: int
    last: int
    spills: list[str]
    shard_offsets: list[int]  # first shard number of each part
    rows_per_shard: int
    stage_dir: str
    duplicates_dir: str


def index_buckets(task: BucketTask) -> dict[int, int]:
    """Write the index of each bucket and its duplicates file; return bucket -> duplicates."""
    files = [pq.ParquetFile(path) for path in task.spills]
    for path, f in zip(task.spills, files, strict=True):
        if f.num_row_groups != UID_INDEX_BUCKETS:
            raise RuntimeError(f"{path}: {f.num_row_groups} row groups, not one per bucket")
    found = {}
    for bucket in range(task.first, task.last):
        found[bucket] = _index_bucket(task, bucket, files)
    for f in files:
        f.close()
    return found


def _index_bucket(task: BucketTask, bucket: int, files: list[pq.ParquetFile]) -> int:
    uids, parts, rows = [], [], []
    for part, f in enumerate(files):
        group = f.read_row_group(bucket, columns=["uid", "row"])
        uids.append(group.column("uid"))
        rows.append(group.column("row"))
        parts.append(pa.array(np.full(group.num_rows, part, np.int32)))
    table = pa.table({"uid": pa.chunked_array(uids, pa.string()),
                      "part": pa.chunked_array(parts, pa.int32()),
                      "row": pa.chunked_array(rows, pa.int64())})
    # (part, row) order within each uid: the first row of a run of equal uids is the winner
    table = table.sort_by([("uid", "ascending"), ("part", "ascending"), ("row", "ascending")])
    uid = table.column("uid").combine_chunks()
    repeat = np.zeros(len(uid), bool)
    if len(uid) > 1:
        repeat[1:] = pc.equal(uid.slice(1), uid.slice(0, len(uid) - 1)).to_numpy(zero_copy_only=False)
    first = table.filter(pa.array(~repeat))
    offsets = np.asarray(task.shard_offsets, np.int64)
    numbers = offsets[first.column("part").to_numpy()] + first.column("row").to_numpy() // task.rows_per_shard
    index = pa.table({"uid": first.column("uid"),
                      "shard": pa.array([f"{n:05d}" for n in numbers.tolist()], pa.string())},
                     schema=INDEX_SCHEMA)
    with storage.staged(index_path(task.stage_dir, bucket)) as tmp:
        pq.write_table(index, tmp)
    duplicates = table.filter(pa.array(repeat)).select(["part", "row"])
    if duplicates.num_rows:
        path = Path(task.duplicates_dir) / f"{bucket:02x}.parquet"
        pq.write_table(duplicates.cast(DUPLICATES_SCHEMA), path)
    return duplicates.num_rows


def bucket_tasks(spills: list[str], shard_offsets: list[int], rows_per_shard: int,
                 stage_dir: str, duplicates_dir: str) -> list[BucketTask]:
    return [BucketTask(first, min(first + BUCKETS_PER_TASK, UID_INDEX_BUCKETS), spills,
                       shard_offsets, rows_per_shard, stage_dir, duplicates_dir)
            for first in range(0, UID_INDEX_BUCKETS, BUCKETS_PER_TASK)]


def duplicate_rows(duplicate_files: list[str], part: int) -> np.ndarray:
    """Sorted row numbers of one part's repeated uids (every bucket's file, filtered)."""
    found = [pq.read_table(f, filters=[("part", "=", part)]).column("row").to_numpy()
             for f in duplicate_files]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def index_complete(stage_dir: str | Path) -> bool:
    """Every bucket's file is there (one listing, not one request per bucket)."""
    try:
        names = {Path(p).name for p in storage.list_files(storage.join(str(stage_dir), UID_INDEX_DIR))}
    except storage.MissingPath:
        return False
    return all(f"{b:02x}.parquet" in names for b in range(UID_INDEX_BUCKETS))
