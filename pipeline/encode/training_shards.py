"""The training-shard contract shared by the encode stage (writer) and train/ (reader).

See docs/formats.md. Tensors travel as `.npy` entries saved without pickle; bfloat16, which
numpy lacks, is stored as its raw uint16 bits and named in the manifest.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import storage

FORMAT_NAME = "rectiflow-sd3-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
NULL_PROMPT_NAME = "null_prompt.safetensors"
TEXT_COMPONENTS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


def text_entry(variant: str, component: str) -> str:
    """WebDataset entry name of one text tensor, e.g. 'synthetic.t5.npy'."""
    return f"{variant}.{component}.npy"


@dataclass
class EncoderInfo:
    id: str
    revision: str | None = None
    hidden: int = 0
    pooled: int = 0
    max_length: int = 77


@dataclass
class VaeInfo:
    id: str
    revision: str | None = None
    latent_channels: int = 16
    downsample: int = 8
    shift_factor: float = 0.0
    scaling_factor: float = 1.0


@dataclass
class ShardInfo:
    name: str
    samples: int
    sha256: str
    bucket_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetManifest:
    vae: VaeInfo
    text_encoders: dict[str, EncoderInfo]
    buckets: list[list[int]]
    variants: list[str]
    shards: list[ShardInfo] = field(default_factory=list)
    latent_dtype: str = "float16"
    text_dtype: str = "float16"
    latent_std: bool = True
    clip_max_length: int = 77
    t5_max_length: int = 77
    counts: dict[str, int] = field(default_factory=dict)
    config_hash: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetManifest:
        data = json.loads(text)
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"dataset format_version {data.get('format_version')} is not supported "
                f"(this rectiflow reads version {FORMAT_VERSION})"
            )
        data["vae"] = VaeInfo(**data["vae"])
        data["text_encoders"] = {k: EncoderInfo(**v) for k, v in data["text_encoders"].items()}
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)

    @classmethod
    def load(cls, dataset: str | Path) -> DatasetManifest:
        """The manifest of a training dataset: a local folder or an fsspec URL (s3://...)."""
        url = storage.join(dataset, MANIFEST_NAME)
        try:
            return cls.from_json(storage.read_bytes(url).decode())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url} is missing: {dataset} is not a training dataset") from e


def tensor_to_npy(tensor: torch.Tensor, dtype: str) -> bytes:
    """Serialise a tensor as .npy bytes in `dtype` (bfloat16 as uint16 bits)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {SUPPORTED_DTYPES}")
    t = tensor.detach().to("cpu", getattr(torch, dtype)).contiguous()
    array = t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_to_tensor(data: bytes, dtype: str) -> torch.Tensor:
    """Inverse of `tensor_to_npy`; never unpickles."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The json entry of a decoded WebDataset sample as a dict."""
    raw = sample["json"]
    return json.loads(raw) if isinstance(raw, bytes | str) else raw
