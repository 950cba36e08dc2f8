"""The shapes world's autoencoder recipe: what the demo's 16-channel VAE trains on and weighs.

train/autoencoder.py is a generic trainer (whole images, MSE + L1 + KL); this recipe spends a
CPU's few hundred steps a minute on what the world's latents must carry. Most steps see
32 px crops, half of them centred on object pixels, at a quarter of a whole image's cost;
the last 30% see whole images. The loss weights pixels that differ from the background
(objects are a small part of each image), the colour part of the error (hue is learned last
otherwise) and each image's mean colour (mostly its background, which the other weights
leave behind). With 4x downsampling (the demo's), 90 s on 2 cores gave 25.6 dB held-out
PSNR and hues read back right 98% of the time; whole images with the plain loss needed 180 s
for 84%, and at 8x downsampling 210 s gave 63% (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from train.autoencoder import (
    AutoencoderTrainConfig,
    TrainingRecipe,
    random_flips,
    reconstruction_loss,
    to_model_range,
)


@dataclass
class ShapesWorldRecipe(TrainingRecipe):
    # Extra loss weight on pixels far from the image's median colour: objects are a small part
    # of each image, and without it the net spends its first hundreds of steps on backgrounds.
    detail_weight: float = 5.0
    # Extra L1 weight on the error's colour part (its deviation from the grey axis): without it
    # the net learns shapes and brightness first and renders most hues as blue or grey.
    chroma_weight: float = 16.0
    # L1 weight on the error of each image's mean colour (see loss).
    global_weight: float = 8.0
    # Most steps train on crops of this side, half of them centred on object pixels: the
    # objects are what the latents must carry, and a crop costs a quarter of a whole 64 px
    # image. Whole images only learned hues after ~3x the steps. 0: whole images only.
    crop_size: int = 32
    crop_batch_size: int = 16
    # The last part of the run (by steps or time) trains on whole images, so GroupNorm
    # statistics and the mid-block attention see what they will see when encoding.
    whole_image_fraction: float = 0.3

    def check(self, config: AutoencoderTrainConfig) -> None:
        if self.crop_size % config.downsample or not 0 <= self.whole_image_fraction <= 1:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of the downsample "
                             f"factor {config.downsample}, and whole_image_fraction in [0, 1]")

    def batch(self, train, step, progress, config, generator) -> torch.Tensor:
        cropping = 0 < self.crop_size < train.shape[-1] and progress < 1 - self.whole_image_fraction
        count = self.crop_batch_size if cropping else config.batch_size
        index = torch.randint(len(train), (count,), generator=generator)
        x = random_flips(to_model_range(train[index]), generator)
        return object_crops(x, self.crop_size, generator) if cropping else x

    def loss(self, vae: AutoencoderKL, x: torch.Tensor, config: AutoencoderTrainConfig):
        total, error = reconstruction_loss(vae, x, config, self._weigh)
        # Each image's mean colour: mostly its background, which the weights above leave to a
        # small share of the loss and which GroupNorm's per-image normalisation hides.
        return total + self.global_weight * error.mean(dim=(2, 3)).abs().mean()

    def _weigh(self, x: torch.Tensor, error: torch.Tensor, per_pixel: torch.Tensor):
        chroma_error = error - error.mean(dim=1, keepdim=True)  # (B, 3, S, S)
        per_pixel = per_pixel + self.chroma_weight * chroma_error.abs()
        median = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
        detail = (x - median).abs().mean(dim=1, keepdim=True)  # (B, 1, S, S)
        return per_pixel * (1 + self.detail_weight * detail)


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


def demo_autoencoder_config(steps: int, time_budget_s: float, n_images: int) -> AutoencoderTrainConfig:
    """The demo's network: downsample 4, not SD3's 8. The world's images are 64 px and its
    small objects 10 px, so 8x8 latents would give an object about one latent pixel, and a
    CPU-trained autoencoder then loses its colour (hues read back from reconstructions: 63%
    after 210 s at 8x, 98% after 90 s at 4x)."""
    return AutoencoderTrainConfig(time_budget_s=time_budget_s, steps=steps,
                                  block_out_channels=(16, 32, 64),
                                  heldout_images=min(64, n_images // 8))


def train_world_autoencoder(download_dir: Path, out_dir: Path, steps: int, time_budget_s: float):
    """The demo's autoencoder on the downloaded world images, saved to out_dir."""
    from train.autoencoder import load_images, train_autoencoder

    images = load_images(download_dir, 64)
    config = demo_autoencoder_config(steps, time_budget_s, len(images))
    recipe = ShapesWorldRecipe()
    recipe.check(config)
    return train_autoencoder(images, out_dir, config, recipe)
