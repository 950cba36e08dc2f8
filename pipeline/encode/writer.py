"""Writing training shards (docs/formats.md, "Training shards"): samples, index, manifest.

One tar entry per tensor, saved as `.npy` without pickle, so plain `webdataset`, Hugging Face
`datasets` and numpy read the shards; tar members carry mtime 0 and a fixed owner, so the
same inputs give byte-identical shards (and checksums) on every rerun.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from pipeline.core.manifest import ShardManifest, write_json_atomic
from pipeline.encode.buckets import Placement, bucket_name
from pipeline.encode.training_shards import (
    MANIFEST_NAME,
    NULL_PROMPT_NAME,
    TEXT_COMPONENTS,
    DatasetManifest,
    EncoderInfo,
    ShardInfo,
    VaeInfo,
    tensor_to_npy,
    text_entry,
)

ENCODERS_NAME = "encoders.json"  # written by the encode workers, read to build dataset.json
INDEX_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("bucket", pa.string()),  # "HxW" in pixels
    ("caption_original", pa.string()),
    ("caption_synthetic", pa.string()),  # null when the run has no synthetic captions
    ("synthetic_fallback", pa.bool_()),  # true: the original caption filled the synthetic slot
    ("score_clip", pa.float32()),
    ("score_aesthetic", pa.float32()),
])


@dataclass
class EncodedSample:
    uid: str
    placement: Placement
    latent_mean: torch.Tensor  # (16, h, w)
    latent_std: torch.Tensor | None  # (16, h, w)
    captions: dict[str, str]  # variant -> text
    text: dict[str, dict[str, torch.Tensor]]  # variant -> component -> tensor (no batch dim)
    scores: dict[str, float | None] = field(default_factory=dict)
    synthetic_fallback: bool = False


def sample_entries(sample: EncodedSample, latent_dtype: str, text_dtype: str) -> dict[str, bytes]:
    """Tar entry name (after the uid and its dot) -> bytes, for one sample."""
    entries = {"latent_mean.npy": tensor_to_npy(sample.latent_mean, latent_dtype)}
    if sample.latent_std is not None:
        entries["latent_std.npy"] = tensor_to_npy(sample.latent_std, latent_dtype)
    for variant, components in sample.text.items():
        for name in TEXT_COMPONENTS:
            entries[text_entry(variant, name)] = tensor_to_npy(components[name], text_dtype)
    placement = sample.placement
    meta = {"uid": sample.uid, "bucket": list(placement.bucket), "crop": list(placement.crop_box),
            "original_size": list(placement.original_size), "captions": sample.captions,
            "synthetic_fallback": sample.synthetic_fallback}
    entries["json"] = json.dumps(meta, sort_keys=True).encode()
    return entries


class TrainingShardWriter:
    """A shard's tar and its Parquet index, written side by side in the same order."""

    def __init__(self, tar_path: Path, index_path: Path, latent_dtype: str, text_dtype: str):
        self.tar = tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT)
        self.index = pq.ParquetWriter(index_path, INDEX_SCHEMA)
        self.dtypes = (latent_dtype, text_dtype)

    def write(self, samples: list[EncodedSample]) -> None:
        for sample in samples:
            for name, data in sample_entries(sample, *self.dtypes).items():
                info = tarfile.TarInfo(f"{sample.uid}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                self.tar.addfile(info, io.BytesIO(data))
        rows = [{"uid": s.uid, "bucket": bucket_name(s.placement.bucket),
                 "caption_original": s.captions.get("original"),
                 "caption_synthetic": s.captions.get("synthetic"),
                 "synthetic_fallback": s.synthetic_fallback,
                 "score_clip": s.scores.get("score_clip"),
                 "score_aesthetic": s.scores.get("score_aesthetic")} for s in samples]
        self.index.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))

    def close(self) -> None:
        self.tar.close()
        self.index.close()


def write_null_prompt(out_dir: Path, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """The embeddings of "" (no batch dimension), named like the per-sample components."""
    path = Path(out_dir) / NULL_PROMPT_NAME
    # Several encode actors write it at once: a temporary name unique across processes.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)


def write_encoders(out_dir: Path, vae: VaeInfo, encoders: dict[str, EncoderInfo]) -> None:
    data = {"vae": vae.__dict__, "text_encoders": {k: v.__dict__ for k, v in encoders.items()}}
    write_json_atomic(Path(out_dir) / ENCODERS_NAME, data)


def bucket_counts(index_path: Path) -> dict[str, int]:
    buckets = pq.read_table(index_path, columns=["bucket"])["bucket"].to_pylist()
    counts: dict[str, int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return dict(sorted(counts.items()))


def write_dataset_manifest(
    out_dir: Path, manifests: list[ShardManifest], base: DatasetManifest
) -> DatasetManifest:
    """dataset.json from the shard manifests, the workers' encoder info and `base` settings."""
    out_dir = Path(out_dir)
    encoders = json.loads((out_dir / ENCODERS_NAME).read_text())
    base.vae = VaeInfo(**encoders["vae"])
    base.text_encoders = {k: EncoderInfo(**v) for k, v in encoders["text_encoders"].items()}
    base.shards, fallbacks = [], 0
    for manifest in sorted(manifests, key=lambda m: m.shard):
        name, index = f"shards/{manifest.shard}.tar", out_dir / f"shards/{manifest.shard}.parquet"
        counts = bucket_counts(index)
        base.shards.append(ShardInfo(name, sum(counts.values()), manifest.outputs[name], counts))
        fallbacks += sum(pq.read_table(index, columns=["synthetic_fallback"])[0].to_pylist())
    dropped: dict[str, int] = {}
    for manifest in manifests:
        for reason, count in manifest.reasons.items():
            dropped[reason] = dropped.get(reason, 0) + count
    base.counts = {"samples": sum(s.samples for s in base.shards),
                   "rows_in": sum(m.rows_in for m in manifests),
                   "synthetic_fallback": fallbacks,
                   **{f"dropped_{reason}": count for reason, count in sorted(dropped.items())}}
    (out_dir / MANIFEST_NAME).write_text(base.to_json())
    return base
