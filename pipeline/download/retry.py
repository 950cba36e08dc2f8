"""`--retry-failed`: re-fetch only the retryable failures of a finished download.

Rows whose reason is retryable (timeouts, 408, 429, 5xx, connection errors) are fetched again,
each not before its `download_retry_at` (the server's Retry-After, else exponential backoff on
the attempt count); the affected shards' tar, Parquet and manifest are rewritten atomically
and every other row and its bytes are carried over unchanged.
"""

from __future__ import annotations

import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.manifest import ShardManifest, read_manifests, remove_stale_temporaries
from pipeline.core.runners import RunnerConfig
from pipeline.download.stage import (
    INPUTS_DIR,
    STAGE,
    DownloadConfig,
    SampleResult,
    ShardWorker,
    distribute,
    download_shard,
    fetch_sample,
)


def retry_failed(
    config: DownloadConfig, runner: RunnerConfig, run_dir: Path, rounds: int = 1
) -> list[ShardManifest]:
    """Re-fetch retryable failures, shard by shard, for up to `rounds` passes."""
    stage_dir = Path(run_dir) / STAGE
    remove_stale_temporaries(stage_dir)
    for _ in range(rounds):
        shards = [(m.shard, stage_dir / INPUTS_DIR / f"{m.shard}.parquet")
                  for m in read_manifests(stage_dir) if _has_retryable(stage_dir, m.shard)]
        if not shards:
            break
        distribute(config, runner, stage_dir, shards, RetryShardDownloader(config, str(stage_dir)))
    return read_manifests(stage_dir)


def _has_retryable(stage_dir: Path, shard: str) -> bool:
    table = pq.read_table(stage_dir / f"{shard}.parquet", columns=["download_retryable"])
    return any(table.column("download_retryable").to_pylist())


@dataclass
class RetryShardDownloader(ShardWorker):
    """Shard worker that redoes only the retryable rows (distributed like the first pass)."""

    config: DownloadConfig
    stage_dir: str

    def run(self, shard: str, input_path: Path) -> None:
        previous = PreviousShard(Path(self.stage_dir), shard)
        try:
            download_shard(self.config, Path(self.stage_dir), shard, input_path,
                           previous.fetcher(self.config))
        finally:
            previous.close()


class PreviousShard:
    """A completed shard's rows and tar entries, read on demand (never the whole tar)."""

    def __init__(self, stage_dir: Path, shard: str):
        rows = pq.read_table(stage_dir / f"{shard}.parquet").to_pylist()
        # Duplicates share their uid with the first occurrence; they are decided again anyway.
        self.rows = {r["uid"]: r for r in rows if r["download_reason"] != "duplicate_uid"}
        self._file = open(stage_dir / f"{shard}.tar", "rb")  # noqa: SIM115 -- closed in close()
        self._lock = threading.Lock()
        self._members: dict[str, list[tuple[str, int, int]]] = {}
        with tarfile.open(fileobj=self._file) as tar:
            for member in tar.getmembers():
                uid = member.name.split(".", 1)[0]
                self._members.setdefault(uid, []).append((member.name, member.offset_data, member.size))

    def entries(self, uid: str) -> list[tuple[str, bytes]]:
        out = []
        with self._lock:
            for name, offset, size in self._members.get(uid, []):
                self._file.seek(offset)
                out.append((name, self._file.read(size)))
        return out

    def fetcher(self, config: DownloadConfig):
        def fetch_or_reuse(row: dict) -> SampleResult:
            before = self.rows.get(row["uid"])
            if row.get("download_reason_in") or before is None:
                return fetch_sample(row, config)
            if not before["download_retryable"]:
                return SampleResult(dict(before), self.entries(row["uid"]))
            wait = (before["download_retry_at"] or 0.0) - time.time()
            time.sleep(min(max(wait, 0.0), config.retry_max_wait_s))  # honour Retry-After
            return fetch_sample(row, config, attempts=before["download_attempts"] + 1)

        return fetch_or_reuse

    def close(self) -> None:
        self._file.close()
