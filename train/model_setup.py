"""The network to train and the check that a dataset fits it.

The dataset manifest says what the shards hold (latent channels, text widths, buckets); the
model config says what the network consumes. Training on data made for another model would
run and learn nothing useful, so every disagreement is refused up front, all listed at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.convert import config_from_diffusers, load_diffusers_transformer
from model.mmdit import MMDiT, MMDiTConfig
from pipeline.encode.training_shards import SUPPORTED_DTYPES, DatasetManifest
from train.config import ModelConfig


class DatasetMismatchError(ValueError):
    """The training data was made for a different model than the one configured."""


def _pretrained_dir(path: str) -> Path:
    root = Path(path)
    return root / "transformer" if (root / "transformer" / "config.json").exists() else root


def build_model_config(section: ModelConfig) -> MMDiTConfig:
    if section.pretrained:
        raw = json.loads((_pretrained_dir(section.pretrained) / "config.json").read_text())
        return config_from_diffusers(raw)
    overrides = dict(section.mmdit)
    if "dual_attention_layers" in overrides:
        overrides["dual_attention_layers"] = tuple(overrides["dual_attention_layers"])
    return MMDiTConfig.from_preset(section.preset, **overrides)


def build_model(section: ModelConfig) -> MMDiT:
    """A fresh network from the preset, or the weights of a diffusers SD3 transformer."""
    if section.pretrained:
        return load_diffusers_transformer(_pretrained_dir(section.pretrained)).float()
    return MMDiT(build_model_config(section))


def dataset_mismatches(manifest: DatasetManifest, cfg: MMDiTConfig, section: ModelConfig) -> list[str]:
    """Every way in which `manifest`'s data does not fit a network configured as `cfg`."""
    problems = []
    enc = manifest.text_encoders
    if set(enc) != {"clip_l", "clip_g", "t5"}:
        problems.append(f"text encoders {sorted(enc)} are not SD3's clip_l, clip_g, t5")
        return problems
    if manifest.vae.latent_channels != cfg.in_channels:
        problems.append(f"latent channels: data {manifest.vae.latent_channels}, model in_channels {cfg.in_channels}")
    if enc["t5"].hidden != cfg.joint_attention_dim:
        problems.append(f"context width: data T5 hidden {enc['t5'].hidden}, model joint_attention_dim {cfg.joint_attention_dim}")
    if enc["clip_l"].hidden + enc["clip_g"].hidden > enc["t5"].hidden:
        problems.append("CLIP-L + CLIP-G hidden widths exceed the T5 width they are padded to")
    pooled = enc["clip_l"].pooled + enc["clip_g"].pooled
    if pooled != cfg.pooled_projection_dim:
        problems.append(f"pooled width: data {pooled} (CLIP-L + CLIP-G), model pooled_projection_dim {cfg.pooled_projection_dim}")
    for dtype in (manifest.latent_dtype, manifest.text_dtype):
        if dtype not in SUPPORTED_DTYPES:
            problems.append(f"dtype {dtype!r} is not one of {SUPPORTED_DTYPES}")
    step = manifest.vae.downsample * cfg.patch_size
    limit = cfg.pos_embed_max_size * step  # the table counts patches
    for height, width in manifest.buckets:
        if height % step or width % step:
            problems.append(f"bucket {height}x{width} px is not a multiple of VAE downsample x patch = {step}")
        if max(height, width) > limit:
            problems.append(f"bucket {height}x{width} px exceeds the position table ({cfg.pos_embed_max_size} patches = {limit} px)")
    if section.vae_id and manifest.vae.id != section.vae_id:
        problems.append(f"VAE: data encoded with {manifest.vae.id!r}, model.vae_id is {section.vae_id!r}")
    return problems


def check_dataset(manifest: DatasetManifest, cfg: MMDiTConfig, section: ModelConfig, where: str) -> None:
    problems = dataset_mismatches(manifest, cfg, section)
    if problems:
        listed = "\n  - ".join(problems)
        raise DatasetMismatchError(
            f"refusing to train on {where}: its manifest does not match the model config:\n  - {listed}"
        )
