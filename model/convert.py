"""Weights to and from diffusers' `SD3Transformer2DModel` directories (config.json + safetensors).

Our parameter names are diffusers' except three renames (FeedForward's `net.0.proj`/`net.2`
and the `to_out.0` list index), so conversion is a key mapping. The last block's text query
projection (and its QK norm) exists in diffusers' layout but cannot affect any output (that
block's text stream is dropped), so our model does not carry it: loading ignores it and
export writes a neutral value (zeros, ones for the norm scale).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.mmdit import MMDiT, MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CLASS = "SD3Transformer2DModel"

# (ours, diffusers) key fragments; each applies to whole dotted components.
_RENAMES = [
    (r"\.(ff|ff_context)\.fc1\.", r".\1.net.0.proj."),
    (r"\.(ff|ff_context)\.fc2\.", r".\1.net.2."),
    (r"\.(attn|attn2)\.to_out\.", r".\1.to_out.0."),
]


def to_diffusers_key(key: str) -> str:
    for ours, theirs in _RENAMES:
        key = re.sub(ours, theirs, key)
    return key


def from_diffusers_key(key: str) -> str:
    key = re.sub(r"\.(ff|ff_context)\.net\.0\.proj\.", r".\1.fc1.", key)
    key = re.sub(r"\.(ff|ff_context)\.net\.2\.", r".\1.fc2.", key)
    return re.sub(r"\.(attn|attn2)\.to_out\.0\.", r".\1.to_out.", key)


def dead_diffusers_keys(config: MMDiTConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """diffusers keys of the last block's unused text query: key -> (shape, fill value)."""
    prefix, dim = f"transformer_blocks.{config.num_layers - 1}.attn.", config.hidden_size
    keys = {prefix + "add_q_proj.weight": ((dim, dim), 0.0), prefix + "add_q_proj.bias": ((dim,), 0.0)}
    if config.qk_norm is not None:
        keys[prefix + "norm_added_q.weight"] = ((config.attention_head_dim,), 1.0)
    return keys


def config_from_diffusers(raw: dict) -> MMDiTConfig:
    known = {f.name for f in fields(MMDiTConfig)}
    values = {k: v for k, v in raw.items() if k in known and v is not None}
    return MMDiTConfig(**values)


def config_to_diffusers(config: MMDiTConfig) -> dict:
    import diffusers

    return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": diffusers.__version__,
            **config.to_dict()}


def _transformer_dir(path: str | Path) -> Path:
    # Accept the transformer folder itself or a whole pipeline folder holding one.
    path = Path(path)
    return path / "transformer" if (path / "transformer" / "config.json").exists() else path


def read_diffusers_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / INDEX_NAME).exists():
        shard_names = sorted(set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in shard_names:
            state.update(load_file(directory / name))
        return state
    return load_file(directory / WEIGHTS_NAME)


def load_diffusers_transformer(path: str | Path, dtype: torch.dtype | None = None) -> MMDiT:
    """An MMDiT holding the weights of a diffusers SD3Transformer2DModel directory."""
    directory = _transformer_dir(path)
    raw_config = json.loads((directory / "config.json").read_text())
    if raw_config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(f"{directory} holds a {raw_config['_class_name']}, not {DIFFUSERS_CLASS}")
    config = config_from_diffusers(raw_config)
    theirs = read_diffusers_state_dict(directory)
    for key in dead_diffusers_keys(config):
        theirs.pop(key, None)
    state = {from_diffusers_key(k): v if dtype is None else v.to(dtype) for k, v in theirs.items()}
    with torch.device("meta"):  # no double allocation for multi-billion-parameter models
        model = MMDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export_diffusers_transformer(
    model: MMDiT, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write `model` as a diffusers SD3Transformer2DModel directory; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {to_diffusers_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    for key, (shape, fill) in dead_diffusers_keys(model.config).items():
        state[key] = torch.full(shape, fill, dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(config_to_diffusers(model.config), indent=2))
    _write_shards(state, out_dir, max_shard_bytes)
    return out_dir


def _write_shards(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
