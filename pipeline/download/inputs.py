"""URL lists (Parquet, CSV, TSV, JSONL parts; local or on object storage) cut into input shards.

`urls` is a file, a glob, a folder of parts or a list of those (pipeline/core/storage.py
`list_files`: sorted, side files like `_SUCCESS` left out). Every part is checked before
anything is written: one format, every configured column present (url; caption unless
`captions_optional`; explicit passthrough columns; `face_bboxes` when blurring faces), and
(Parquet, CSV, TSV) the same columns as the first part; a part that differs is an error
naming it, the column and the columns it has. Column names come from the config or its list
preset (pipeline/download/presets.py); a headerless CSV/TSV (CC12M) gets `column_names`.

Shard ids: each part is cut on its own, in parallel (a process pool, or Ray tasks for a Ray
run), into `rows_per_shard`-row shards (a part's last shard may be shorter); part p's shards
are numbered after those of parts 0..p-1, `NNNNN` as before. So the ids are the same on
every rerun of the same list, and a one-file list is cut exactly as it always was.
Appending a part that sorts last adds shards without renumbering; a part inserted in the
middle renumbers the shards after it (they are redone).

Duplicates: no per-row set on the driver; the uid index pass (pipeline/download/uid_index.py)
finds repeated uids across all parts bucket by bucket; the first occurrence in (part, row)
order wins and the later ones get `duplicate_uid`, `missing_url` rows keep their reason.
Rows that cannot be fetched still travel through their shard, so every input row gets an
output row.

A shard file is rewritten only if its content changed (completed manifests stay valid), and
`_inputs/_cut.json` records what was cut from which parts (size and modification stamp): a
rerun on the same list skips the cutting altogether.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.core import reasons, storage
from pipeline.core.command import InputError
from pipeline.core.config import atomic_write_text
from pipeline.core.manifest import sha256_file
from pipeline.core.uids import uid_for
from pipeline.download import uid_index
from pipeline.download.tasks import map_in_order

if TYPE_CHECKING:
    from pipeline.core.runners import RunnerConfig
    from pipeline.download.stage import DownloadConfig

_READ_BATCH = 65_536
INPUTS_DIR = "_inputs"
CUT_RECORD = "_cut.json"
_WORK = ".cut"  # scratch folder of one cut; removed at the end, and at the start of the next
_CUT_FIELDS = ("preset", "url_column", "caption_column", "captions_optional", "id_column",
               "passthrough_columns", "input_format", "column_names", "blur_faces",
               "rows_per_shard")
# Shard columns that the cut writes itself: an input column of one of these names that is not
# the configured column for it would be silently replaced, so it is an error instead.
_OWN_COLUMNS = {"uid": "id_column", "url": "url_column", "caption": "caption_column"}


def cut_input_shards(
    urls: Any, stage_dir: Path, config: DownloadConfig, runner: RunnerConfig | None = None
) -> list[tuple[str, Path]]:
    """Write `stage_dir/_inputs/NNNNN.parquet` and the uid index; return [(shard, path)]."""
    stage_dir = Path(stage_dir)
    inputs_dir = stage_dir / INPUTS_DIR
    parts = storage.list_files(urls)
    record = {"version": 1, "cut": {k: getattr(config, k) for k in _CUT_FIELDS},
              "parts": [{"path": p, "stamp": _stamp(p)} for p in parts]}
    done = _previous_cut(inputs_dir, record, stage_dir)
    if done is not None:
        return done
    fmt = check_parts(parts, config)
    inputs_dir.mkdir(parents=True, exist_ok=True)
    (inputs_dir / CUT_RECORD).unlink(missing_ok=True)  # no record claims a half-done cut
    work = inputs_dir / _WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        shards = _cut(parts, fmt, stage_dir, work, config, runner)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["shards"] = [shard for shard, _ in shards]
    atomic_write_text(inputs_dir / CUT_RECORD, json.dumps(record, indent=1, default=str))
    return shards


def _cut(parts, fmt, stage_dir, work, config, runner) -> list[tuple[str, Path]]:
    ray_runner = runner if runner is not None and runner.backend == "ray" else None
    processes = config.processes_count

    def run(fn, jobs):
        return map_in_order(fn, jobs, processes, ray_runner)

    cuts = run(cut_part, [PartJob(i, p, fmt, config, str(work)) for i, p in enumerate(parts)])
    offsets = np.concatenate([[0], np.cumsum([c.shards for c in cuts])]).tolist()
    dup_dir = work / "duplicates"
    dup_dir.mkdir()
    spills = [c.spill for c in cuts]
    tasks = uid_index.bucket_tasks(spills, offsets[:-1], config.rows_per_shard,
                                   str(stage_dir), str(dup_dir))
    found = {b: n for counts in run(uid_index.index_buckets, tasks) for b, n in counts.items()}
    dup_files = [str(dup_dir / f"{b:02x}.parquet") for b, n in sorted(found.items()) if n]
    finish = [FinishJob(c.index, c.shards, offsets[c.index], str(work),
                        str(stage_dir / INPUTS_DIR), dup_files, config.rows_per_shard)
              for c in cuts]
    return [shard for shards in run(finish_part, finish) for shard in shards]


def _stamp(path: str) -> str:
    """Size and modification stamp of a part (mtime, S3 ETag, GCS md5): what says "changed"."""
    info = storage.info(path)
    keys = ("size", "mtime", "ETag", "LastModified", "md5Hash", "updated")
    return json.dumps({k: info.get(k) for k in keys if info.get(k) is not None}, default=str)


def _previous_cut(inputs_dir: Path, record: dict, stage_dir: Path) -> list[tuple[str, Path]] | None:
    """The shards of the last cut when it was of the same parts with the same settings."""
    try:
        previous = json.loads((inputs_dir / CUT_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if {k: previous.get(k) for k in ("version", "cut", "parts")} != json.loads(
            json.dumps(record, default=str)):
        return None
    shards = [(s, inputs_dir / f"{s}.parquet") for s in previous.get("shards", [])]
    if not all(path.is_file() for _, path in shards) or not uid_index.index_complete(stage_dir):
        return None
    return shards


# --- reading parts ----------------------------------------------------------------------


def detect_format(path: str) -> str:
    name = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"),
                        (".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise InputError(f"cannot tell the format of {path}; set download.input_format")


def check_parts(parts: list[str], config: DownloadConfig) -> str:
    """The parts' one format, after checking every part's columns; errors name the part."""
    formats = {p: config.input_format if config.input_format != "auto" else detect_format(p)
               for p in parts}
    fmt = formats[parts[0]]
    for part, other in formats.items():
        if other != fmt:
            raise InputError(f"URL list part {part} is {other}, but {parts[0]} is {fmt}")
    with ThreadPoolExecutor(min(16, len(parts))) as pool:  # footers: latency-bound on S3
        columns = list(pool.map(lambda p: _columns(p, fmt, config), parts))
    reference = next((c for c in columns if c is not None), None)
    for part, cols in zip(parts, columns, strict=True):
        if cols is None:  # an empty CSV/JSONL part: no rows, nothing to check
            continue
        check_columns(list(cols), config, part)
        if fmt != "jsonl" and cols != reference:
            first = parts[columns.index(reference)]
            raise InputError(f"URL list part {part} has other columns than {first}: "
                             f"{_difference(reference, cols)}")
    return fmt


def check_columns(present: list[str], config: DownloadConfig, part: str) -> None:
    """Every configured column is in the part; errors name the column, the part and the
    columns it has (never a column of nulls in its place)."""
    wanted = {"url_column": config.url_column}
    if not config.captions_optional:
        wanted["caption_column"] = config.caption_column
    names, required = config.passthrough()
    if required:
        wanted.update({f"passthrough_columns {n!r}": n for n in names or []})
    if config.blur_faces:  # never "blurred nothing" because the boxes were not there
        wanted["blur_faces"] = "face_bboxes"
    for setting, name in wanted.items():
        if name not in present:
            hint = (" (or download.captions_optional=true for a list without captions)"
                    if setting == "caption_column" else "")
            preset = f" (preset {config.preset!r})" if config.preset != "none" else ""
            raise InputError(f"URL list part {part} has no column {name!r} (download.{setting}"
                             f"{preset}); its columns: {sorted(present)}{hint}")
    for own, setting in _OWN_COLUMNS.items():
        if own in present and getattr(config, setting) != own:
            raise InputError(
                f"URL list part {part} has a column {own!r}, which would be replaced by the "
                f"shard's own {own!r}; set download.{setting}={own} to use it (or a preset "
                f"that does: download.preset=datacomp for DataComp's uid)")


def _delimiter(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


def _columns(part: str, fmt: str, config: DownloadConfig) -> dict[str, str] | None:
    """Column name -> type (Parquet), or -> "string" (CSV/TSV header or configured names,
    JSONL first row's keys); None for an empty CSV, TSV or JSONL part."""
    try:
        with storage.open_file(part) as f:
            if fmt == "parquet":
                return {field.name: str(field.type) for field in pq.read_schema(f)}
            line = f.readline().decode("utf-8")
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(f"URL list part {part} cannot be read as {fmt}: {e}") from e
    if not line.strip():
        return None
    if fmt in ("csv", "tsv"):
        fields = _split_line(line, fmt)
        if config.column_names is None:
            return dict.fromkeys(fields, "string")
        if len(fields) != len(config.column_names):
            raise InputError(f"URL list part {part}:1 has {len(fields)} fields, but "
                             f"download.column_names names {len(config.column_names)}: "
                             f"{config.column_names}")
        return dict.fromkeys(config.column_names, "string")
    try:
        return dict.fromkeys(json.loads(line), "string")
    except json.JSONDecodeError as e:
        raise InputError(f"{part}:1: not JSON: {e}") from e


def _difference(expected: dict[str, str], found: dict[str, str]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(f"{k} {expected[k]} -> {found[k]}" for k in set(expected) & set(found)
                     if expected[k] != found[k])
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in
                     (("missing", missing), ("extra", extra), ("other types", changed)) if names)


def read_url_batches(path: str, config: DownloadConfig, fmt: str) -> Iterator[pa.Table]:
    """Stream one part in batches, whatever its format and wherever it is."""
    with storage.open_file(path) as f:
        if fmt == "parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_READ_BATCH):
                yield pa.Table.from_batches([batch])
        elif fmt in ("csv", "tsv"):
            first = f.readline().decode("utf-8")
            if not first.strip():
                return  # an empty part
            header = config.column_names or _split_line(first, fmt)
            f.seek(0)
            types = {name: pa.string() for name in header}  # no type guessing per block
            # A TSV has no quoting (CC12M captions contain bare quotes); a CSV keeps it.
            parse = pacsv.ParseOptions(delimiter=_delimiter(fmt),
                                       quote_char='"' if fmt == "csv" else False)
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(column_names=config.column_names),
                parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=types))
            try:
                for batch in reader:
                    yield pa.Table.from_batches([batch])
            except pa.ArrowInvalid as e:
                raise InputError(f"URL list part {path} cannot be read as {fmt}: {e}") from e
        else:
            yield from _read_jsonl(path, io.TextIOWrapper(f, encoding="utf-8"))


def _split_line(line: str, fmt: str) -> list[str]:
    if fmt == "tsv":
        return line.rstrip("\r\n").split("\t")
    return next(csv.reader([line]), [])


def _read_jsonl(path: str, lines) -> Iterator[pa.Table]:
    rows: list[dict] = []
    for line_number, line in enumerate(lines, 1):
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


# --- pass 1: each part into shards (scratch names) and a uid spill file --------------------


@dataclass
class PartJob:
    index: int
    path: str
    fmt: str
    config: DownloadConfig
    work: str


@dataclass
class PartCut:
    index: int
    shards: int
    spill: str


def _part_dir(work: str, index: int) -> Path:
    return Path(work) / f"{index:05d}"


def cut_part(job: PartJob) -> PartCut:
    config = job.config
    folder = _part_dir(job.work, job.index)
    folder.mkdir()
    uids, buckets, shards, rows = [], [], 0, 0
    pending, pending_rows = [], 0
    for batch in read_url_batches(job.path, config, job.fmt):
        table = _with_uids(batch, config, job.path)
        uids.append(table.column("uid").combine_chunks())
        buckets.append(uid_index.buckets_of(table.column("uid").to_pylist()))
        rows += table.num_rows
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= config.rows_per_shard:
            joined = pa.concat_tables(pending, promote_options="permissive")
            pq.write_table(joined.slice(0, config.rows_per_shard), folder / f"{shards:05d}.parquet")
            shards += 1
            rest = joined.slice(config.rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        pq.write_table(pa.concat_tables(pending, promote_options="permissive"),
                       folder / f"{shards:05d}.parquet")
        shards += 1
    spill = str(Path(job.work) / f"{job.index:05d}.uids.parquet")
    uid_index.write_spill(Path(spill), pa.chunked_array(uids, pa.string()).combine_chunks(),
                          pa.chunked_array(buckets, pa.uint16()).combine_chunks(),
                          pa.array(np.arange(rows, dtype=np.int64)))
    return PartCut(job.index, shards, spill)


def _with_uids(batch: pa.Table, config: DownloadConfig, part: str) -> pa.Table:
    """The shard's columns: uid, url, caption, passthrough columns, and a pre-fetch reason
    (`missing_url` here; `duplicate_uid` is decided by the uid index pass)."""
    check_columns(batch.column_names, config, part)  # JSONL rows need not share keys
    urls = batch.column(config.url_column).to_pylist()
    captions = _column_or_nulls(batch, config.caption_column)  # nulls: captions_optional
    ids = _column_or_nulls(batch, config.id_column)
    uids = [uid_for(url or "", caption, given)
            for url, caption, given in zip(urls, captions, ids, strict=True)]
    columns = {"uid": pa.array(uids, pa.string()), "url": pa.array(urls, pa.string()),
               "caption": pa.array([None if c is None else str(c) for c in captions], pa.string())}
    for name in _passthrough(batch, config):
        columns[name] = batch.column(name)
    columns["download_reason_in"] = pa.array(
        [None if url else reasons.MISSING_URL for url in urls], pa.string())
    return pa.table(columns)


def _column_or_nulls(batch: pa.Table, name: str) -> list:
    """The column, or nulls for an optional one (id; caption when captions_optional)."""
    if name in batch.column_names:
        return batch.column(name).to_pylist()
    return [None] * batch.num_rows


def _passthrough(batch: pa.Table, config: DownloadConfig) -> list[str]:
    reserved = {config.url_column, config.caption_column, config.id_column, "uid", "url",
                "caption", "download_reason_in"}
    wanted, _ = config.passthrough()  # required ones were checked: filtering drops none
    if wanted is not None and config.blur_faces and "face_bboxes" not in wanted:
        wanted.append("face_bboxes")  # the fetch reads the boxes from the shard row
    names = batch.column_names if wanted is None else [n for n in wanted if n in batch.column_names]
    return [n for n in names if n not in reserved and not n.startswith("download_")]


# --- pass 3: mark duplicates, publish shards under their run-wide ids ---------------------


@dataclass
class FinishJob:
    index: int
    shards: int
    first_shard: int
    work: str
    inputs_dir: str
    duplicate_files: list[str]
    rows_per_shard: int


def finish_part(job: FinishJob) -> list[tuple[str, Path]]:
    repeated = uid_index.duplicate_rows(job.duplicate_files, job.index)
    out = []
    for k in range(job.shards):
        scratch = _part_dir(job.work, job.index) / f"{k:05d}.parquet"
        start = k * job.rows_per_shard
        local = repeated[(repeated >= start) & (repeated < start + job.rows_per_shard)] - start
        if len(local):
            table = pq.read_table(scratch)
            reason = table.column("download_reason_in").to_pylist()
            for row in local.tolist():
                reason[row] = reason[row] or reasons.DUPLICATE_UID
            column = table.schema.get_field_index("download_reason_in")
            pq.write_table(table.set_column(column, "download_reason_in",
                                            pa.array(reason, pa.string())), scratch)
        shard = f"{job.first_shard + k:05d}"
        out.append((shard, _publish_if_changed(scratch, Path(job.inputs_dir), shard)))
    return out


def _publish_if_changed(scratch: Path, inputs_dir: Path, shard: str) -> Path:
    final = inputs_dir / f"{shard}.parquet"
    if final.exists() and sha256_file(final) == sha256_file(scratch):
        scratch.unlink()  # unchanged: keep the file its manifest was checked against
    else:
        os.replace(scratch, final)
    return final

