"""Writes small training datasets in the documented format (docs/formats.md) for the tests.

Latents are a few fixed prototypes plus a little noise, and each sample's text embeddings
name its prototype, so a model can learn something and a falling loss means learning.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from pipeline.encode.training_shards import (
    MANIFEST_NAME,
    NULL_PROMPT_NAME,
    DatasetManifest,
    EncoderInfo,
    ShardInfo,
    VaeInfo,
    tensor_to_npy,
    text_entry,
)


@dataclass
class TinyDims:
    clip_l: int = 32
    clip_g: int = 32
    t5: int = 64
    clip_len: int = 77
    t5_len: int = 16
    channels: int = 16


@dataclass
class DatasetSpec:
    samples_per_shard: list[int] = field(default_factory=lambda: [8, 8])
    buckets: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64), (64, 96)])
    variants: tuple[str, ...] = ("original", "synthetic")
    latent_dtype: str = "float16"
    latent_std: bool = True
    prototypes: int = 4
    seed: int = 0
    uid_prefix: str = "s"
    nan_uids: tuple[str, ...] = ()  # samples whose latent holds a NaN (stability tests)
    dims: TinyDims = field(default_factory=TinyDims)


def _npy_entries(uid: str, sample: dict[str, torch.Tensor], spec: DatasetSpec) -> dict[str, bytes]:
    entries = {"latent_mean.npy": tensor_to_npy(sample["latent_mean"], spec.latent_dtype)}
    if spec.latent_std:
        entries["latent_std.npy"] = tensor_to_npy(sample["latent_std"], spec.latent_dtype)
    for variant in spec.variants:
        for name, tensor in sample[variant].items():
            entries[text_entry(variant, name)] = tensor_to_npy(tensor, "float16")
    return entries


def _text(proto: int, variant_shift: float, gen: torch.Generator, d: TinyDims) -> dict:
    base = torch.zeros(())
    code = (proto + 1) * 0.5 + variant_shift
    return {
        "clip_l": base + code + 0.1 * torch.randn(d.clip_len, d.clip_l, generator=gen),
        "clip_l_pooled": base + code + 0.1 * torch.randn(d.clip_l, generator=gen),
        "clip_g": base - code + 0.1 * torch.randn(d.clip_len, d.clip_g, generator=gen),
        "clip_g_pooled": base - code + 0.1 * torch.randn(d.clip_g, generator=gen),
        "t5": base + code + 0.1 * torch.randn(d.t5_len, d.t5, generator=gen),
    }


def make_sample(uid: str, bucket: tuple[int, int], spec: DatasetSpec, gen: torch.Generator):
    d = spec.dims
    h, w = bucket[0] // 8, bucket[1] // 8
    proto = int(torch.randint(spec.prototypes, (1,), generator=gen))
    pattern = torch.linspace(-1, 1, h * w).reshape(1, h, w) * (proto - 1.5)
    mean = pattern.expand(d.channels, h, w) * torch.linspace(0.5, 1.5, d.channels)[:, None, None]
    sample = {
        "latent_mean": mean + 0.05 * torch.randn(d.channels, h, w, generator=gen),
        "latent_std": torch.full((d.channels, h, w), 0.01),
    }
    for i, variant in enumerate(spec.variants):
        sample[variant] = _text(proto, 0.01 * i, gen, d)
    meta = {"uid": uid, "bucket": list(bucket), "crop": [0, 0, bucket[0], bucket[1]],
            "original_size": list(bucket),
            "captions": {v: f"{v} caption of prototype {proto}" for v in spec.variants}}
    return sample, meta


def write_shard(tar_path: Path, samples: list[tuple[str, dict[str, bytes], dict]]) -> str:
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for uid, entries, meta in samples:
            entries = {**entries, "json": json.dumps(meta).encode()}
            for name, data in entries.items():
                info = tarfile.TarInfo(f"{uid}.{name}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(tar_path.read_bytes()).hexdigest()


def write_dataset(out_dir: Path, spec: DatasetSpec | None = None) -> DatasetManifest:
    spec = spec or DatasetSpec()
    d = spec.dims
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    shard_infos, total = [], 0
    for shard_id, count in enumerate(spec.samples_per_shard):
        rows, samples, counts = [], [], {}
        for i in range(count):
            uid = f"{spec.uid_prefix}{shard_id:03d}_{i:04d}"
            bucket = spec.buckets[int(torch.randint(len(spec.buckets), (1,), generator=gen))]
            sample, meta = make_sample(uid, bucket, spec, gen)
            if uid in spec.nan_uids:
                sample["latent_mean"][0, 0, 0] = float("nan")
            samples.append((uid, _npy_entries(uid, sample, spec), meta))
            key = f"{bucket[0]}x{bucket[1]}"
            counts[key] = counts.get(key, 0) + 1
            rows.append({"uid": uid, "bucket": key, "caption_original": meta["captions"]["original"]})
        name = f"shards/{shard_id:05d}.tar"
        sha = write_shard(out_dir / name, samples)
        pq.write_table(pa.Table.from_pylist(rows), out_dir / f"shards/{shard_id:05d}.parquet")
        shard_infos.append(ShardInfo(name=name, samples=count, sha256=sha, bucket_counts=counts))
        total += count
    null = _text(-1, 0.0, gen, d)
    save_file({k: v.half().contiguous() for k, v in null.items()}, out_dir / NULL_PROMPT_NAME)
    manifest = DatasetManifest(
        vae=VaeInfo(id="tiny-vae", shift_factor=0.0609, scaling_factor=1.5305),
        text_encoders={
            "clip_l": EncoderInfo(id="tiny-clip-l", hidden=d.clip_l, pooled=d.clip_l, max_length=d.clip_len),
            "clip_g": EncoderInfo(id="tiny-clip-g", hidden=d.clip_g, pooled=d.clip_g, max_length=d.clip_len),
            "t5": EncoderInfo(id="tiny-t5", hidden=d.t5, max_length=d.t5_len),
        },
        buckets=[list(b) for b in spec.buckets],
        variants=list(spec.variants),
        shards=shard_infos,
        latent_dtype=spec.latent_dtype,
        latent_std=spec.latent_std,
        clip_max_length=d.clip_len,
        t5_max_length=d.t5_len,
        counts={"samples": total},
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
