"""The download stage: URL lists in, WebDataset shards plus a Parquet row for every input out.

How it uses img2dataset (see docs/download.md for why): locally its
`multiprocessing_distributor` spreads shards over processes, the same way its own
`Downloader` is spread; on Ray shards run as Ray tasks of ours (pipeline/download/tasks.py),
bounded by `runner.concurrency` and retried `download.shard_retries` times, because
img2dataset's `ray_distributor` submits every shard at once and drops failures. The per-shard
worker is ours, because every
requirement that makes a download safe and accountable lives in the per-request code
(`pipeline.download.fetch`: total deadline, address policy per hop, robots headers; `pipeline.core.decode`:
formats, header pixel cap, EXIF, RGB conversion; `pipeline.core.reasons`: classified failures).

Flow: the URL list (Parquet, CSV or JSONL parts, local or on object storage) is cut into
input shards of `rows_per_shard` rows with stable uids (`_inputs/NNNNN.parquet`, plus the uid
index; pipeline/download/inputs.py); each shard is fetched with a thread pool,
in input order, and written atomically with its manifest; a rerun skips completed shards.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core import reasons
from pipeline.core.config import config_to_dict
from pipeline.core.decode import DecodeConfig, ImageRejected, validate_download
from pipeline.core.manifest import (
    ShardManifest,
    completed_manifest,
    read_manifests,
    remove_stale_temporaries,
    shard_outputs,
)
from pipeline.core.runners import RunnerConfig, ensure_ray
from pipeline.download.faces import blur_faces
from pipeline.download.fetch import FetchConfig, fetch
from pipeline.download.inputs import INPUTS_DIR as INPUTS_DIR  # where retry.py finds them
from pipeline.download.inputs import cut_input_shards
from pipeline.download.presets import PRESETS as LIST_PRESETS
from pipeline.download.tasks import ray_map

STAGE = "download"
# Fields that change how fast a shard is made, not what it contains.
_EXECUTION_FIELDS = ("thread_count", "processes_count", "rows_per_shard", "retry_base_s",
                     "retry_max_wait_s", "shard_retries")

# Fields added after runs existed, left out of the fingerprint at their defaults, so that
# upgrading does not redo every completed shard of a run whose settings did not change.
_ADDED_DEFAULTS = {"preset": "none", "captions_optional": False, "blur_faces": False}
_NO_VALUE = object()


@dataclass
class DownloadConfig:
    # A public list's column names (pipeline/download/presets.py); the column settings
    # below, when given, override the preset's.
    preset: Literal["none", "laion", "laion5b", "datacomp", "coyo", "cc12m"] = "none"
    url_column: str | None = None  # None: the preset's ("url" without one)
    caption_column: str | None = None  # must be in the list unless captions_optional
    captions_optional: bool = False  # a list without captions: every caption null
    id_column: str | None = None  # used as the uid when the input has this column
    # None: the preset's columns that the list has (no preset: every other input column);
    # a list given here must all be in the list.
    passthrough_columns: list[str] | None = None
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    column_names: list[str] | None = None  # a headerless CSV/TSV's columns (no header row)
    # Blur the `face_bboxes` boxes (DataComp) in the stored image; download_sha256 is then
    # of the blurred bytes (pipeline/download/faces.py).
    blur_faces: bool = False
    rows_per_shard: int = 10_000
    thread_count: int = 64  # concurrent requests per process
    processes_count: int = 1  # local pool size (img2dataset multiprocessing); 0: in-process
    retry_base_s: float = 2.0  # --retry-failed backoff: base * 2**(attempts-1), or Retry-After
    retry_max_wait_s: float = 300.0
    shard_retries: int = 2  # a shard whose worker failed is run again up to this many times
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self):
        preset = LIST_PRESETS[self.preset]
        for name in ("url_column", "caption_column", "id_column"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        if self.input_format == "auto" and preset.input_format != "auto":
            self.input_format = preset.input_format
        if self.column_names is None and preset.column_names is not None:
            self.column_names = list(preset.column_names)
        if self.column_names is not None and self.input_format not in ("csv", "tsv"):
            raise ValueError("column_names names a headerless CSV/TSV's columns: set "
                             "input_format to csv or tsv")
        if self.rows_per_shard < 1 or self.thread_count < 1 or self.processes_count < 0:
            raise ValueError("rows_per_shard and thread_count must be >= 1, processes_count >= 0")
        if self.shard_retries < 0:
            raise ValueError(f"shard_retries = {self.shard_retries} must not be negative")

    def passthrough(self) -> tuple[list[str] | None, bool]:
        """The passthrough columns (None: every other column) and whether each must exist."""
        if self.passthrough_columns is not None:
            return list(self.passthrough_columns), True
        preset = LIST_PRESETS[self.preset].passthrough
        return (None if preset is None else list(preset)), False

    def fingerprint(self) -> str:
        data = {k: v for k, v in config_to_dict(self).items() if k not in _EXECUTION_FIELDS
                and _ADDED_DEFAULTS.get(k, _NO_VALUE) != v}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class SampleResult:
    """One row's outcome: its Parquet columns and, on success, its WebDataset entries."""

    row: dict[str, Any]
    entries: list[tuple[str, bytes]] = field(default_factory=list)


def fetch_sample(row: dict[str, Any], config: DownloadConfig, attempts: int = 1) -> SampleResult:
    """Fetch, check and decode one input row; never raises."""
    out = {**row, **_EMPTY_RESULT, "download_attempts": attempts}
    if row.get("download_reason_in"):  # decided while cutting shards (duplicate, no url)
        out["download_attempts"] = 0
        return _failed(out, row["download_reason_in"], "rejected before fetching")
    fetched = fetch(row["url"], config.fetch)
    out["download_http_status"] = fetched.http_status
    if not fetched.ok:
        return _failed(out, fetched.reason, fetched.error, fetched.retry_after_s, config, attempts)
    data = fetched.data
    try:
        image = validate_download(data, config.decode)  # every failure comes back as a reason
        if config.blur_faces:
            data, out["download_faces_blurred"] = blur_faces(
                data, row.get("face_bboxes") or [], config.decode.jpeg_quality)
            if out["download_faces_blurred"]:  # the stored bytes: their size, format, copy
                image = validate_download(data, config.decode)
    except ImageRejected as e:
        return _failed(out, e.reason, str(e))
    except (OSError, ValueError) as e:  # the image decoded once, but not again to blur it
        return _failed(out, reasons.DECODE_ERROR, f"blurring faces: {e}")
    return SampleResult(out, stored_sample(out, image, data))


def stored_sample(out: dict[str, Any], image, data: bytes) -> list[tuple[str, bytes]]:
    """Mark row `out` a success with the facts of the bytes stored; return its tar entries
    (the original bytes, the row as JSON, the resized copy when one was made). Download and
    ingest both store samples this way."""
    out.update(download_status="success", download_width=image.width,
               download_height=image.height, download_format=image.format,
               download_bytes=len(data), download_sha256=hashlib.sha256(data).hexdigest())
    uid = out["uid"]
    entries = [(f"{uid}.{image.format}", data), (f"{uid}.json", _sample_json(out))]
    if image.resized_jpeg is not None:
        entries.append((f"{uid}.resized.jpg", image.resized_jpeg))
    return entries


_EMPTY_RESULT = {
    "download_status": "failed", "download_reason": None, "download_retryable": False,
    "download_http_status": None, "download_width": None, "download_height": None,
    "download_format": None, "download_bytes": None, "download_sha256": None,
    "download_attempts": 1, "download_error": None, "download_retry_at": None,
    "download_faces_blurred": None,  # boxes blurred when download.blur_faces, else null
}
RESULT_SCHEMA = pa.schema([
    ("download_status", pa.string()), ("download_reason", pa.string()),
    ("download_retryable", pa.bool_()), ("download_http_status", pa.int32()),
    ("download_width", pa.int32()), ("download_height", pa.int32()),
    ("download_format", pa.string()), ("download_bytes", pa.int64()),
    ("download_sha256", pa.string()), ("download_attempts", pa.int32()),
    ("download_error", pa.string()), ("download_retry_at", pa.float64()),
    ("download_faces_blurred", pa.int32()),
])


def _failed(out, reason, error, retry_after_s=None, config=None, attempts=1) -> SampleResult:
    retryable = reasons.is_retryable(reason)
    out.update(download_status="failed", download_reason=reason, download_retryable=retryable,
               download_error=(error or "")[:500])
    if retryable and config is not None:
        # Earliest time a retry is polite: the server's Retry-After, else exponential backoff.
        wait = retry_after_s if retry_after_s is not None else config.retry_base_s * 2 ** (attempts - 1)
        out["download_retry_at"] = round(time.time() + min(wait, config.retry_max_wait_s), 3)
    return SampleResult(out)


def _sample_json(row: dict[str, Any]) -> bytes:
    keep = {k: v for k, v in row.items() if not k.startswith("download_") or k in _JSON_FIELDS}
    return json.dumps(keep, sort_keys=True, default=str).encode()


_JSON_FIELDS = {"download_width", "download_height", "download_format", "download_sha256",
                "download_faces_blurred"}


def ordered_map(fn: Callable, items: Iterable, threads: int, window: int) -> Iterator:
    """`map` over a thread pool, in input order, with at most `window` results in memory."""
    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        iterator = iter(items)
        pending = deque(pool.submit(fn, item) for item in itertools.islice(iterator, window))
        while pending:
            result = pending.popleft().result()
            for item in iterator:  # keep the window full
                pending.append(pool.submit(fn, item))
                break
            yield result


class ShardWorker:
    """A per-shard worker: `run(shard, input path)` raises on failure; called as
    `worker((shard, path))` it follows img2dataset's distributor protocol instead:
    (ok, task), the error printed (the distributor retries the task)."""

    def run(self, shard: str, input_path: Path) -> None:
        raise NotImplementedError

    def __call__(self, task: tuple[str, str]) -> tuple[bool, tuple[str, str]]:
        try:
            self.run(task[0], Path(task[1]))
            return True, task
        except Exception as e:  # noqa: BLE001 -- the distributor retries failed shards
            traceback.print_exc()
            print(f"download shard {task[0]} failed: {e}")
            return False, task

    def run_task(self, task: tuple[str, str]) -> None:
        self.run(task[0], Path(task[1]))


@dataclass
class ShardDownloader(ShardWorker):
    """Downloads one input shard (skipped when already complete)."""

    config: DownloadConfig
    stage_dir: str

    def run(self, shard: str, input_path: Path) -> None:
        download_shard(self.config, Path(self.stage_dir), shard, input_path)


def download_shard(
    config: DownloadConfig,
    stage_dir: Path,
    shard: str,
    input_path: Path,
    fetcher: Callable[[dict], SampleResult] | None = None,
) -> tuple[ShardManifest, bool]:
    """Download one input shard unless it is complete; return its manifest and whether it ran.

    `fetcher` (row -> SampleResult) lets `--retry-failed` reuse earlier outcomes.
    """
    fingerprint = config.fingerprint()
    done = completed_manifest(stage_dir, shard, fingerprint, [input_path])
    if done is not None and fetcher is None:
        return done, False
    rows = pq.read_table(input_path).to_pylist()
    fetcher = fetcher or (lambda row: fetch_sample(row, config))
    manifest = ShardManifest(stage=STAGE, shard=shard, config_hash=fingerprint)
    window = max(4 * config.thread_count, 16)
    with shard_outputs(stage_dir, manifest, [input_path]) as outputs:
        tar_path = outputs.path(f"{shard}.tar")
        results = []
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            samples = ordered_map(fetcher, rows, config.thread_count, window)
            # disable=None: a bar on a terminal, silent in logs and pool workers.
            for sample in tqdm(samples, total=len(rows), desc=f"shard {shard}", unit="img",
                               leave=False, disable=None, mininterval=2):
                for name, payload in sample.entries:
                    _add_to_tar(tar, name, payload)
                sample.row.pop("download_reason_in", None)
                results.append(sample.row)
        write_results(results, outputs.path(f"{shard}.parquet"))
        counts = Counter(r["download_reason"] for r in results if r["download_reason"])
        manifest.rows_in, manifest.rows_out = len(rows), len(rows) - sum(counts.values())
        manifest.reasons = dict(counts.most_common())
    return manifest, True


def _add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: reruns give byte-identical shards
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """Every row of the shard, in input order, with the download_* columns typed."""
    table = pa.Table.from_pylist(rows)
    for name in RESULT_SCHEMA.names:
        kind = RESULT_SCHEMA.field(name).type
        if name not in table.column_names:  # a row reused from a run before the column existed
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
            continue
        column = table.column(name).cast(kind)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    pq.write_table(table, path)


class ShardsFailed(RuntimeError):
    """Some shards still failed after their retries (a rerun resumes them)."""


def run_download(
    config: DownloadConfig, runner: RunnerConfig, urls: Any, run_dir: Path
) -> list[ShardManifest]:
    """Cut the URL list into shards, download every shard not yet done, return all manifests.

    `urls`: a file, a glob, a folder of parts or a list of them, local or a URL
    (pipeline/download/inputs.py)."""
    stage_dir = Path(run_dir) / STAGE
    remove_stale_temporaries(stage_dir)
    shards = cut_input_shards(urls if isinstance(urls, list | tuple) else str(urls),
                              stage_dir, config, runner)
    errors = distribute(config, runner, stage_dir, shards)
    manifests = {m.shard: m for m in read_manifests(stage_dir)}
    missing = [shard for shard, _ in shards if shard not in manifests]
    if missing:
        raise ShardsFailed(failure_report(missing, errors, config.shard_retries))
    return [manifests[shard] for shard, _ in shards]


def failure_report(missing: list[str], errors: dict[str, str], retries: int) -> str:
    lines = [f"{len(missing)} download shard(s) failed after {retries} retries; "
             "rerun the same command to resume: " + ", ".join(missing[:20])
             + (", ..." if len(missing) > 20 else "")]
    lines += [f"  {shard}: {errors[shard]}" for shard in missing[:20] if shard in errors]
    return "\n".join(lines)


def distribute(
    config: DownloadConfig,
    runner: RunnerConfig,
    stage_dir: Path,
    shards: list[tuple[str, Path]],
    worker: ShardWorker | None = None,
) -> dict[str, str]:
    """Run a shard worker over the shards: in-process, img2dataset multiprocessing, or Ray
    tasks (at most `runner.concurrency` in flight, `runner.num_cpus` each). Every backend
    retries a failed shard `config.shard_retries` times. Returns shard -> last error for the
    shards that still failed, where the backend reports it (Ray); the caller checks which
    shards have no manifest."""
    worker = worker or ShardDownloader(config, str(stage_dir))
    tasks = [(shard, str(path)) for shard, path in shards]
    if runner.backend == "ray":
        ensure_ray(runner.ray_address)
        done = ray_map(worker.run_task, tasks, runner.concurrency, runner.num_cpus,
                       retries=config.shard_retries)
        return {tasks[i][0]: error for i, error in done.failed.items()}
    if config.processes_count == 0:
        failed = [task for task in tqdm(tasks, desc=STAGE, unit="shard") if not worker(task)[0]]
        for _ in range(config.shard_retries):
            failed = [task for task in failed if not worker(task)[0]]
        return {}
    from img2dataset.distributor import multiprocessing_distributor  # heavy: only when used

    multiprocessing_distributor(config.processes_count, worker, tasks, None, config.shard_retries)
    return {}
