"""The ingest stage: local data in, download-stage shards out (RUN_DIR/download).

Ingested shards have exactly the download stage's contract (pipeline/download/stage.py): a
tar of `{uid}.{ext}` original bytes + `{uid}.json` (+ `{uid}.resized.jpg` when configured),
and a Parquet row per input with uid, url, caption and the typed download_* columns, every
rejected sample with its reason; the manifest's stage is "download". So score, select,
dedup, caption and encode run on an ingested run unchanged.

Shard k holds records [k * rows_per_shard, (k+1) * rows_per_shard) of the source in its
stable order, so shard ids are the same on every rerun. A shard whose manifest matches (same
config, same records) is skipped; outputs are atomic (pipeline/core/manifest.py).
Runs in-process; Ray is not used by ingest (yet).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import config_to_dict
from pipeline.core.decode import DecodeConfig, ImageRejected, validate_download
from pipeline.core.manifest import (
    ShardManifest,
    completed_manifest,
    remove_stale_temporaries,
    shard_outputs,
)
from pipeline.core.uids import uid_for
from pipeline.download.stage import _EMPTY_RESULT, _add_to_tar, stored_sample, write_results
from pipeline.ingest.sources import Record

STAGE = "download"  # ingest writes download-stage shards
DUPLICATE_UID = "duplicate_uid"


@dataclass
class IngestConfig:
    rows_per_shard: int = 10_000
    caption_field: str = ""  # json field for the caption; "" = .txt/.caption, then caption/text
    class_folders: bool = False  # --folder: ImageNet-style tree, caption from the class folder
    class_template: str = "a photo of a {class}"
    split: str = "train"  # --hf
    image_column: str = "image"
    caption_column: str = "text"
    id_column: str = "id"  # --hf: used as the uid when the dataset has it
    max_bytes: int = 64 << 20  # a member or file larger than this is `too_large`, never read
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self):
        if self.rows_per_shard < 1 or self.max_bytes < 1:
            raise ValueError("rows_per_shard and max_bytes must be >= 1")
        if "{class}" not in self.class_template:
            raise ValueError(f"class_template {self.class_template!r} must contain {{class}}")

    def fingerprint(self, source: str) -> str:
        data = {"config": config_to_dict(self), "source": source}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def sample_row(record: Record, config: IngestConfig, source: str) -> tuple[dict, list]:
    """One record -> its download-contract row and tar entries (none when rejected)."""
    url = f"{source}#{record.key}"  # a locator for people; never opened
    row = {"uid": uid_for(url, record.caption, record.given_id), "url": url,
           "caption": record.caption, **record.extra, **_EMPTY_RESULT, "download_attempts": 0}
    if record.reason is None:
        try:
            image = validate_download(record.data, config.decode)
        except ImageRejected as e:
            record.reason, record.error = e.reason, str(e)
    if record.reason is not None:
        row.update(download_reason=record.reason, download_error=record.error[:500])
        return row, []
    return row, stored_sample(row, image, record.data)


def ingest_shard(config: IngestConfig, stage_dir: Path, shard: str, records: list[Record],
                 source: str, fingerprint: str) -> ShardManifest:
    manifest = ShardManifest(stage=STAGE, shard=shard, config_hash=fingerprint)
    with shard_outputs(stage_dir, manifest, _inputs(records)) as outputs:
        rows, seen = [], set()
        with tarfile.open(outputs.path(f"{shard}.tar"), "w", format=tarfile.PAX_FORMAT) as tar:
            for record in records:
                row, entries = sample_row(record, config, source)
                if row["uid"] in seen:  # within a shard; across shards is not checked
                    row.update(download_status="failed", download_reason=DUPLICATE_UID,
                               download_error="repeated uid")
                    entries = []
                seen.add(row["uid"])
                for name, payload in entries:
                    _add_to_tar(tar, name, payload)
                rows.append(row)
        write_results(rows, outputs.path(f"{shard}.parquet"))
        counts = Counter(r["download_reason"] for r in rows if r["download_reason"])
        manifest.rows_in, manifest.rows_out = len(rows), len(rows) - sum(counts.values())
        manifest.reasons = dict(counts.most_common())
        manifest.extra = {"ingest_source": source}
    return manifest


def _inputs(records: list[Record]) -> dict[str, str]:
    """What shard k read: a digest of its records (key, id, caption, bytes, reason), so a rerun
    skips a shard only when the very same samples landed in it (files added to a folder shift
    the later shards, and those are redone)."""
    digest = hashlib.sha256()
    for r in records:
        data = hashlib.sha256(r.data).hexdigest() if r.data is not None else ""
        fields = [r.key, str(r.given_id), r.caption or "", data, r.reason or ""]
        digest.update(json.dumps(fields).encode())
    return {"ingest": digest.hexdigest()}


def run_ingest(config: IngestConfig, records: Iterator[Record], source: str,
               run_dir: Path) -> tuple[list[ShardManifest], int]:
    """Cut the record stream into shards, write the ones not done; (manifests, shards run).

    `source` names the source (it is in the config hash); each shard's records are in its
    manifest's inputs, so a rerun redoes exactly the shards whose samples changed."""
    stage_dir = Path(run_dir) / STAGE
    remove_stale_temporaries(stage_dir)
    fingerprint = config.fingerprint(source)
    manifests, ran = [], 0
    chunks = iter(lambda: list(itertools.islice(records, config.rows_per_shard)), [])
    for k, chunk in enumerate(chunks):
        shard = f"{k:05d}"
        done = completed_manifest(stage_dir, shard, fingerprint, _inputs(chunk))
        if done is None:
            done, ran = ingest_shard(config, stage_dir, shard, chunk, source, fingerprint), ran + 1
        manifests.append(done)
    return manifests, ran
