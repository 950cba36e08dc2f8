"""Train a small 16-channel AutoencoderKL on a folder of images, as SD3 did first.

The network is diffusers' own `AutoencoderKL`, saved with `save_pretrained`, so any diffusers
tool (and the SD3 pipeline's `vae/` folder) loads it. The objective is reconstruction (MSE +
L1) plus a small KL term; perceptual (LPIPS) and adversarial losses are left out because
their weights cannot be fetched offline. After training the latent shift and scale are
fitted to data statistics (shift = mean, scale = 1 / std of the latents), the way SD3 fitted
0.0609 / 1.5305 for its VAE, and written into the model config as `shift_factor` /
`scaling_factor`. Reconstruction PSNR is measured on held-out images before and after.

The default network downsamples 8x, as SD3's does (`block_out_channels`, one level per 2x).

What each step sees and what its loss weighs is a `TrainingRecipe`: whole images (randomly
flipped) with the plain objective by default. A dataset with its own needs brings its own
recipe (the demo's shapes world: demo/autoencoder_recipe.py); nothing here knows about one.

    rectiflow train-vae --images DIR --out SD3_DIR/vae --autoencoder.time_budget_s=300
"""

from __future__ import annotations

import argparse
import json
import math
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm import tqdm

from pipeline.core.decode import IMAGE_EXTENSIONS, ImageRejected, decode_for_model

IMAGE_SUFFIXES = tuple(sorted(f".{ext}" for ext in IMAGE_EXTENSIONS))  # the decode module's table
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
    image_size: int = 64
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

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


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
        except ImageRejected:  # any reason of the decode module
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
    image = decode_for_model(data, size).image  # upright RGB; JPEG: about the target size
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


def random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, S, S)


def reconstruction_loss(vae: AutoencoderKL, x: torch.Tensor, config: AutoencoderTrainConfig,
                        pixel_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction + weighted per-element KL, the reconstruction error).

    Reconstruction is MSE + L1 per pixel; `pixel_weight(x, error, per_pixel)`, if given,
    returns the per-pixel loss a recipe wants instead (reweighted or with terms added)
    before averaging. The error is returned so a recipe can add whole-image terms of its
    own. x is (B, 3, S, S) in [-1, 1].
    """
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample  # (B, 3, S, S)
    kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
    error = recon - x
    per_pixel = error.pow(2) + config.l1_weight * error.abs()  # (B, 3, S, S)
    if pixel_weight is not None:
        per_pixel = pixel_weight(x, error, per_pixel)
    return per_pixel.mean() + config.kl_weight * kl_per_element, error


class TrainingRecipe:
    """Whole images, randomly flipped, with the plain objective. Subclass to change what a
    step sees (`batch`) or what its loss weighs (`loss`)."""

    def batch(self, train: torch.Tensor, step: int, progress: float,
              config: AutoencoderTrainConfig, generator: torch.Generator) -> torch.Tensor:
        """The step's input (B, 3, S, S) in [-1, 1]; progress runs 0..1 over the run."""
        index = torch.randint(len(train), (config.batch_size,), generator=generator)
        return random_flips(to_model_range(train[index]), generator)

    def loss(self, vae: AutoencoderKL, x: torch.Tensor,
             config: AutoencoderTrainConfig) -> torch.Tensor:
        return reconstruction_loss(vae, x, config)[0]


def learning_rate(config: AutoencoderTrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to 5% over progress (steps or time, whichever leads)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_steps(vae: AutoencoderKL, train: torch.Tensor, config: AutoencoderTrainConfig,
                recipe: TrainingRecipe):
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
            loss = recipe.loss(vae, recipe.batch(train, step, progress, config, generator), config)
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
    images: torch.Tensor, out_dir: str | Path, config: AutoencoderTrainConfig,
    recipe: TrainingRecipe | None = None,
) -> AutoencoderTrainResult:
    """Train on uint8 images (N, 3, S, S), fit shift/scale, save in diffusers format to out_dir."""
    previous_threads = torch.get_num_threads()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        return _train_and_save(images, Path(out_dir), config, recipe or TrainingRecipe())
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_save(images: torch.Tensor, out: Path, config: AutoencoderTrainConfig,
                    recipe: TrainingRecipe):
    torch.manual_seed(config.seed)
    train, heldout = split_heldout(images, config.heldout_images, config.seed)
    vae = build_autoencoder(config)
    psnr_before = reconstruction_psnr(vae, heldout)
    began = time.monotonic()
    steps, curve = train_steps(vae, train, config, recipe)
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
