"""Autoencoder training: a tiny real run through the CLI (the generic recipe: whole images,
MSE + L1 + KL), saved in diffusers format and reloaded. The shapes world's own recipe is
tested in tests/demo/test_autoencoder_recipe.py."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL

from demo.shapes_world import WorldConfig, generate_world
from pipeline.core.config import RESOLVED_CONFIG_NAME, ConfigError, load_config
from train.autoencoder import (
    METRICS_NAME,
    AutoencoderTrainConfig,
    load_images,
    main,
    to_model_range,
)

pytestmark = pytest.mark.timeout(120)

WORLD = WorldConfig(n_images=96, n_heldout=0, n_tuning=0, broken_file_fraction=0.1, dead_url_fraction=0,
                    duplicate_fraction=0, seed=3)
# Four levels keep downsample 8 (64 px -> 8x8x16 latents); tiny widths keep it quick on CPU.
TINY = ["--autoencoder.steps=60", "--autoencoder.batch_size=8", "--autoencoder.num_threads=1",
        "--autoencoder.block_out_channels=[8, 8, 16, 16]", "--autoencoder.norm_num_groups=4",
        "--autoencoder.heldout_images=16", "--autoencoder.warmup_steps=5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(WORLD, out, "http://127.0.0.1:1")
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    assert main(["--images", str(world / "images"), "--out", str(out), *TINY]) == 0
    return out, json.loads((out / METRICS_NAME).read_text())


def test_training_lowers_loss_and_raises_psnr(trained):
    _, metrics = trained
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert metrics["steps"] == len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10, losses
    assert metrics["psnr_after"] > metrics["psnr_before"] + 1.0, metrics
    assert metrics["heldout_images"] == 16


def test_saved_model_loads_with_diffusers_and_round_trips(trained, world):
    out, metrics = trained
    vae = AutoencoderKL.from_pretrained(out).eval()
    assert vae.config.latent_channels == 16
    assert vae.config.shift_factor == pytest.approx(metrics["shift_factor"])
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    images = load_images(world / "images", 64)
    with torch.no_grad():
        latents = vae.encode(to_model_range(images[:4])).latent_dist.mode()
        assert latents.shape == (4, 16, 8, 8)
        assert vae.decode(latents).sample.shape == (4, 3, 64, 64)
        # The fitted factors normalise the data's latents: zero mean, about unit spread.
        posterior = vae.encode(to_model_range(images[:64])).latent_dist
        normalised = (posterior.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(normalised.mean())) < 0.25
    assert 0.5 < float(normalised.std()) <= 1.05
    assert "steps = 60" in (out / RESOLVED_CONFIG_NAME).read_text()


def test_load_images_skips_broken_files_and_reads_tar_shards(world, tmp_path):
    readable = load_images(world / "images", 32)
    rows = pq.read_table(world / "urls.parquet").to_pylist()
    broken = sum(r["planted_defect"] in ("truncated", "html_as_image") for r in rows)
    files = sorted((world / "images").iterdir())
    assert broken > 0 and len(readable) == len(files) - broken
    assert readable.shape[1:] == (3, 32, 32)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for path in files[:5]:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{path.stem}{path.suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        (info := tarfile.TarInfo("x.txt")).size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    from_tar = load_images(tmp_path, 32)
    assert 0 < len(from_tar) <= 5 and from_tar.dtype == torch.uint8


def test_config_rejects_widths_that_groupnorm_cannot_split():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_config({"autoencoder": AutoencoderTrainConfig}, None,
                    ["--autoencoder.block_out_channels=[12, 16, 16, 16]"])
