"""Aspect-ratio buckets: every batch has one shape of about `resolution`^2 pixels.

SD3 finetunes at 1024^2 "with mixed aspect ratios" without listing its buckets; this builds
the usual list (as SDXL and kohya do): for each side that is a multiple of `multiple`, the
largest other side that keeps the area within resolution^2, both orientations, up to
`max_aspect`. An image goes to the bucket nearest in log aspect ratio, is resized to cover
it and centre-cropped, and JPEGs are decoded once at about that size (Pillow draft mode, in
pipeline/core/decode.py), because a full-size decode followed by a resize wastes most of the
CPU on large photos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.core.decode import decode_for_model

# VAE downsampling 8 x MMDiT patch 2: a side that is not a multiple of 16 cannot be patched.
MIN_MULTIPLE = 16


@dataclass
class BucketConfig:
    resolution: int = 256  # target area resolution^2: 256 pretraining, 1024 finetuning
    multiple: int = 32  # sides are multiples of this (>= 16; 64 is SDXL's choice at 1024)
    max_aspect: float = 4.0  # longest / shortest side of the most extreme bucket

    def __post_init__(self):
        if self.multiple < MIN_MULTIPLE or self.multiple % MIN_MULTIPLE:
            raise ValueError(f"multiple = {self.multiple} must be a multiple of {MIN_MULTIPLE}")
        if self.resolution < self.multiple:
            raise ValueError(f"resolution = {self.resolution} is below multiple {self.multiple}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect = {self.max_aspect} must be at least 1")


@dataclass(frozen=True)
class Placement:
    """Where one image went: its bucket and the part of the original image that was kept."""

    bucket: tuple[int, int]  # (height, width) in pixels
    crop_box: tuple[float, float, float, float]  # (left, top, right, bottom), original pixels
    original_size: tuple[int, int]  # (height, width) after EXIF orientation


def make_buckets(config: BucketConfig) -> list[tuple[int, int]]:
    """Bucket shapes (height, width), sorted from tallest to widest.

    One bucket per short side (and its transpose): iterating the long side as well would add
    near-duplicate shapes that only split batches further.
    """
    area, step = config.resolution**2, config.multiple
    shapes = set()
    for short in range(step, config.resolution + 1, step):
        long = (area // short) // step * step
        if long / short <= config.max_aspect + 1e-9:
            shapes.update({(short, long), (long, short)})
    return sorted(shapes, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger area)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - aspect), -hw[0] * hw[1]))


def cover_crop_box(
    height: int, width: int, bucket: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The centred box of the original image that, resized, fills the bucket exactly."""
    bucket_h, bucket_w = bucket
    scale = max(bucket_h / height, bucket_w / width)  # resize to cover, then crop the rest
    crop_w, crop_h = bucket_w / scale, bucket_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def cover_size(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) an upright image must be decoded at to cover its bucket: what draft
    mode may shrink a JPEG to, never below."""
    bucket = nearest_bucket(height, width, buckets)
    scale = max(bucket[0] / height, bucket[1] / width)
    return (math.ceil(width * scale), math.ceil(height * scale))


def load_bucketed(
    data: bytes, buckets: list[tuple[int, int]], max_pixels: int = 89_478_485
) -> tuple[Image.Image, Placement]:
    """Decode image bytes once, at about the bucket size, and resize + centre-crop into it.

    Raises ImageRejected (pipeline.core.decode) with the reason for unusable bytes.
    """
    decoded = decode_for_model(data, lambda w, h: cover_size(w, h, buckets), max_pixels)
    height, width = decoded.height, decoded.width  # full size, upright
    bucket = nearest_bucket(height, width, buckets)
    box = cover_crop_box(height, width, bucket)
    image = decoded.image  # upright RGB, possibly draft-scaled: scale the box with it
    factor_x, factor_y = image.size[0] / width, image.size[1] / height
    scaled_box = (box[0] * factor_x, box[1] * factor_y, box[2] * factor_x, box[3] * factor_y)
    resized = image.resize((bucket[1], bucket[0]), Image.Resampling.BICUBIC, box=scaled_box)
    rounded = tuple(round(v, 2) for v in box)
    return resized, Placement(bucket, rounded, (height, width))


def to_vae_input(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as the VAE's input: (3, H, W) float32 in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"
