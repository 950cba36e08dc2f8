"""Train a small 16-channel AutoencoderKL on a folder of images, as SD3 did first.

The network is diffusers' own `AutoencoderKL`, saved with `save_pretrained`, so any diffusers
tool (and the SD3 pipeline's `vae/` folder) loads it. The objective is reconstruction plus a
small KL term; perceptual (LPIPS) and adversarial losses are left out because their weights
cannot be fetched offline and flat synthetic images do not need them. After training the
latent shift and scale are fitted to data statistics (shift = mean, scale = 1 / std of the
latents), the way SD3 fitted 0.0609 / 1.5305 for its VAE, and written into the model config
as `shift_factor` / `scaling_factor`. Reconstruction PSNR is measured on held-out images
before and after training.

The default network downsamples 8x, as SD3's does (`block_out_channels`, one level per 2x).

A CPU affords a few hundred steps a minute, so training spends them on what the latents must
carry. Most steps see 32 px crops, half of them centred on object pixels, at a quarter of a
whole image's cost; the last 30% see whole images. The loss weights pixels that differ from
the background (objects are a small part of each image), the colour part of the error (hue
is learned last otherwise) and each image's mean colour (mostly its background, which the
other weights leave behind). On the shapes world with 4x downsampling (the demo's), 90 s on
2 cores gave 25.6 dB held-out PSNR and hues read back right 98% of the time; whole images
with the old weights needed 180 s for 84%, and at 8x downsampling 210 s gave 63%.

    rectiflow train-vae --images WORLD/images --out SD3_DIR/vae --autoencoder.time_budget_s=300
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METRICS_NAME = "training_metrics.json"


@dataclass
class AutoencoderTrainConfig:
    steps: int = 1500
    time_budget_s: float = 300.0  # training stops at whichever of steps and budget comes first
    batch_size: int = 8  # on a CPU, more small steps learn faster than fewer large ones
    lr: float = 2e-3
    grad_clip: float = 1.0  # lets the high learning rate through the early loss spikes
    warmup_steps: int = 20
    kl_weight: float = 1e-5  # on the per-element mean KL; small, as in SD's VAEs
    l1_weight: float = 1.0  # added to MSE: L1 keeps flat regions and edges sharp
    # Extra loss weight on pixels far from the image's median colour: objects are a small part
    # of each image, and without it the net spends its first hundreds of steps on backgrounds.
    detail_weight: float = 5.0
    # Extra L1 weight on the error's colour part (its deviation from the grey axis): without it
    # the net learns shapes and brightness first and renders most hues as blue or grey.
    chroma_weight: float = 16.0
    # L1 weight on the error of each image's mean colour (see training_loss).
    global_weight: float = 8.0
    image_size: int = 64
    # Most steps train on crops of this side, half of them centred on object pixels (drawn in
    # proportion to how far each pixel is from the image's median colour): the objects are what
    # the latents must carry, and a crop costs a quarter of a whole 64 px image. Whole images
    # only learned hues after ~3x the steps. 0: whole images only.
    crop_size: int = 32
    crop_batch_size: int = 16
    # The last part of the run (by steps or time) trains on whole images, so GroupNorm
    # statistics and the mid-block attention see what they will see when encoding.
    whole_image_fraction: float = 0.3
    block_out_channels: tuple[int, ...] = (16, 32, 32, 64)  # 4 levels: downsample 8
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 8
    initial_logvar: float = -6.0
    heldout_images: int = 64  # for PSNR; never trained on
    stats_images: int = 512  # images encoded to fit shift and scale
    num_threads: int = 0  # torch CPU threads while training; 0 keeps torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must all be "
                             f"divisible by norm_num_groups={self.norm_num_groups}")
        downsample = 2 ** (len(self.block_out_channels) - 1)
        if self.crop_size % downsample or not 0 <= self.whole_image_fraction <= 1:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of the downsample "
                             f"factor {downsample}, and whole_image_fraction in [0, 1]")


@dataclass
class AutoencoderTrainResult:
    out_dir: str
    steps: int
    seconds: float
    train_images: int
    heldout_images: int
    psnr_before: float
    psnr_after: float
    shift_factor: float
    scaling_factor: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def build_autoencoder(config: AutoencoderTrainConfig) -> AutoencoderKL:
    levels = len(config.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        force_upcast=False,
    )
    # The posterior's log-variance starts near 0 (std 1), which drowns the encoder's small
    # initial means in noise and leaves the decoder nothing to learn from for the first
    # hundreds of steps; starting it low lets reconstruction begin at once, and the KL term
    # is still free to raise it.
    with torch.no_grad():
        vae.quant_conv.bias[config.latent_channels :] = config.initial_logvar
    return vae


def load_images(source: str | Path, size: int) -> torch.Tensor:
    """Every readable image under `source` (files, or members of .tar shards) as (N, 3, S, S) uint8.

    Unreadable files (truncated downloads, HTML saved as .jpg) are skipped: the web is like that.
    """
    arrays = []
    for _name, data in tqdm(_image_blobs(Path(source)), desc="load images", leave=False):
        try:
            arrays.append(_decode_square(data, size))
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    if not arrays:
        raise ValueError(f"no readable images under {source}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _image_blobs(source: Path):
    """(name, bytes) in a stable order for files and .tar members under `source`."""
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in paths:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            yield path.name, path.read_bytes()
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar:
                    # Download shards hold `<uid>.<ext>` originals and may hold derived copies
                    # (`<uid>.resized.jpg`): train on each original once.
                    original = Path(member.name).name.count(".") == 1
                    if member.isfile() and original and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        yield member.name, tar.extractfile(member).read()


def _decode_square(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at about the target size
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != size:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)  # (S, S, 3)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], diffusers' convention


def split_heldout(images: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout): a seeded random `count` images held out (at most a quarter)."""
    count = min(count, len(images) // 4)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[count:]], images[order[:count]]


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean per-image PSNR (dB, pixel range [0, 1]) of decode(mode of encode(x))."""
    vae.eval()
    values = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size])  # (B, 3, S, S)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)  # (B,)
        values += (-10 * torch.log10(mse)).tolist()
    return float(np.mean(values))


@torch.no_grad()
def fit_latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32):
    """(shift, scale) so that (z - shift) * scale has zero mean and unit variance over data.

    The variance of sampled latents is computed exactly from the posterior: the variance of
    the means plus the mean of the posterior variances, so no sampling noise enters the fit.
    """
    vae.eval()
    means, variances = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_model_range(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean.flatten())
        variances.append(posterior.var.flatten())
    mean, var = torch.cat(means), torch.cat(variances)
    total_var = mean.var() + var.mean()
    return float(mean.mean()), float(1.0 / total_var.sqrt())


def object_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One `size` crop of each image, clamped inside it, centred half the time on a pixel
    drawn by its distance from the image's median colour (objects, edges) and half the time
    anywhere (backgrounds must come out right too); x is (B, 3, S, S)."""
    b, _, height, width = x.shape
    median = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    distance = (x - median).abs().sum(dim=1).flatten(1)  # (B, S*S)
    weight = distance / (distance.sum(dim=1, keepdim=True) + 1e-6) + 1.0 / distance.shape[1]
    centre = torch.multinomial(weight, 1, generator=generator).squeeze(1)  # (B,)
    top = (centre // width - size // 2).clamp(0, height - size)
    left = (centre % width - size // 2).clamp(0, width - size)
    corners = zip(top.tolist(), left.tolist(), strict=True)
    return torch.stack([x[i, :, y : y + size, z : z + size] for i, (y, z) in enumerate(corners)])


def random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, S, S)


def training_loss(vae: AutoencoderKL, x: torch.Tensor, config: AutoencoderTrainConfig):
    """Reconstruction (MSE + weighted L1) plus weighted per-element KL; x is (B, 3, S, S)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample  # (B, 3, S, S)
    kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
    error = recon - x
    per_pixel = error.pow(2) + config.l1_weight * error.abs()  # (B, 3, S, S)
    if config.chroma_weight > 0:
        chroma_error = error - error.mean(dim=1, keepdim=True)  # (B, 3, S, S)
        per_pixel = per_pixel + config.chroma_weight * chroma_error.abs()
    if config.detail_weight > 0:
        median = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
        detail = (x - median).abs().mean(dim=1, keepdim=True)  # (B, 1, S, S)
        per_pixel = per_pixel * (1 + config.detail_weight * detail)
    reconstruction = per_pixel.mean()
    if config.global_weight > 0:
        # Each image's mean colour: mostly its background, which the weights above leave to
        # a small share of the loss and which GroupNorm's per-image normalisation hides.
        reconstruction = reconstruction + config.global_weight * error.mean(dim=(2, 3)).abs().mean()
    return reconstruction + config.kl_weight * kl_per_element


def learning_rate(config: AutoencoderTrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to 5% over progress (steps or time, whichever leads)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_steps(vae: AutoencoderKL, train: torch.Tensor, config: AutoencoderTrainConfig):
    """Run the optimisation; return (steps done, loss curve)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    curve: list[tuple[int, float]] = []
    start, step = time.monotonic(), 0
    vae.train()
    with tqdm(total=config.steps, desc="train autoencoder") as bar:
        while step < config.steps:
            elapsed = time.monotonic() - start
            if elapsed >= config.time_budget_s:
                break
            progress = max(step / config.steps, elapsed / config.time_budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, progress)
            cropping = 0 < config.crop_size < train.shape[-1] and (
                progress < 1 - config.whole_image_fraction)
            count = config.crop_batch_size if cropping else config.batch_size
            index = torch.randint(len(train), (count,), generator=generator)
            x = random_flips(to_model_range(train[index]), generator)
            if cropping:
                x = object_crops(x, config.crop_size, generator)
            loss = training_loss(vae, x, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            optimizer.step()
            curve.append((step, loss.item()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
    return step, curve


def train_autoencoder(
    images: torch.Tensor, out_dir: str | Path, config: AutoencoderTrainConfig
) -> AutoencoderTrainResult:
    """Train on uint8 images (N, 3, S, S), fit shift/scale, save in diffusers format to out_dir."""
    previous_threads = torch.get_num_threads()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        return _train_and_save(images, Path(out_dir), config)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_save(images: torch.Tensor, out: Path, config: AutoencoderTrainConfig):
    torch.manual_seed(config.seed)
    train, heldout = split_heldout(images, config.heldout_images, config.seed)
    vae = build_autoencoder(config)
    psnr_before = reconstruction_psnr(vae, heldout)
    began = time.monotonic()
    steps, curve = train_steps(vae, train, config)
    seconds = time.monotonic() - began
    shift, scale = fit_latent_statistics(vae, train[: config.stats_images])
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(out, safe_serialization=True)
    result = AutoencoderTrainResult(
        out_dir=str(out), steps=steps, seconds=round(seconds, 2), train_images=len(train),
        heldout_images=len(heldout), psnr_before=psnr_before,
        psnr_after=reconstruction_psnr(vae, heldout), shift_factor=shift, scaling_factor=scale,
        loss_curve=curve,
    )
    (out / METRICS_NAME).write_text(json.dumps(asdict(result)) + "\n")
    return result


def main(argv: list[str]) -> int:
    from pipeline.core.config import load_config, split_overrides, write_resolved_config

    parser = argparse.ArgumentParser(
        prog="rectiflow train-vae", description="Train a 16-channel AutoencoderKL on images.")
    parser.add_argument("--images", required=True, help="folder of images or .tar shards")
    parser.add_argument("--out", required=True, help="output folder (diffusers format)")
    parser.add_argument("--config", default=None, help="TOML preset with an [autoencoder] table")
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    sections = load_config({"autoencoder": AutoencoderTrainConfig}, args.config, overrides)
    config = sections["autoencoder"]
    images = load_images(args.images, config.image_size)
    result = train_autoencoder(images, args.out, config)
    write_resolved_config(args.out, sections)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s on {result.train_images} "
          f"images; held-out PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB; "
          f"shift {result.shift_factor:.4f}, scale {result.scaling_factor:.4f}; saved {args.out}")
    return 0
