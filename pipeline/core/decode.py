"""Safe decoding of downloaded bytes: check before decoding, decode once, always end in RGB.

Order matters for safety and speed:
1. `Image.open` reads only the header, so the pixel cap (`too_many_pixels`) and the minimum
   size (`too_small`) are checked before any pixel is decoded: a 60000 x 60000 PNG header
   costs microseconds, not gigabytes.
2. The image is decoded once, JPEGs in draft mode straight to about the size needed (the
   resized copy, or 1/8 scale when only validating), which still reads every byte of the
   stream, so truncated files fail as `decode_error`.
3. EXIF orientation is applied, animated images keep their first frame, and CMYK, 16-bit,
   alpha and palette images become 8-bit RGB (alpha composited on white).
Pillow's own decompression-bomb guard (Image.MAX_IMAGE_PIXELS) is left as it is for the
rest of the process; when it fires first it is reported as `too_many_pixels` too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core import reasons

# Pillow format name -> file extension of the original bytes in the WebDataset shard.
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
               "BMP": "bmp", "TIFF": "tif", "AVIF": "avif", "HEIF": "heic", "ICO": "ico"}
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*")
# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


@dataclass
class DecodeConfig:
    max_pixels: int = 100_000_000  # width * height from the header, checked before decoding
    min_size: int = 64  # shorter side, in pixels; smaller images are `too_small`
    resize_mode: Literal["none", "keep_ratio", "center_crop"] = "keep_ratio"
    image_size: int = 512  # shorter side of the resized copy (center_crop: square side)
    resize_only_if_bigger: bool = True
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.max_pixels <= 0 or self.min_size < 0 or self.image_size <= 0:
            raise ValueError("max_pixels and image_size must be positive, min_size >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality = {self.jpeg_quality} must be in 1..100")


@dataclass
class DecodedImage:
    format: str  # file extension of the original bytes: jpg, png, webp, gif, ...
    width: int  # after EXIF orientation, full resolution
    height: int
    frames: int
    resized_jpeg: bytes | None  # the resized copy when configured


class DecodeRejected(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, config: DecodeConfig) -> DecodedImage:
    """Validate and decode `data`; raises DecodeRejected with a reason class."""
    if not data:
        raise DecodeRejected(reasons.EMPTY_BODY, "empty response body")
    image = _open_header(data, config)
    try:
        width, height, orientation = _oriented_size(image)
        if min(width, height) < config.min_size:
            raise DecodeRejected(reasons.TOO_SMALL, f"{width}x{height} < {config.min_size}")
        frames = getattr(image, "n_frames", 1)
        rgb = _decode_rgb(image, config, (width, height), orientation)
        resized = _resized_jpeg(rgb, config) if config.resize_mode != "none" else None
        return DecodedImage(_EXTENSIONS.get(image.format, (image.format or "bin").lower()),
                            width, height, frames, resized)
    finally:
        image.close()


def _open_header(data: bytes, config: DecodeConfig) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeRejected(reasons.TOO_MANY_PIXELS, str(e)) from e
    except UnidentifiedImageError as e:
        # An image signature that Pillow cannot parse is a broken image, not another format.
        if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
            raise DecodeRejected(reasons.DECODE_ERROR, f"corrupt image header {data[:12]!r}") from e
        raise DecodeRejected(reasons.NOT_AN_IMAGE, _sniff(data)) from e
    except (OSError, SyntaxError, ValueError) as e:  # a known format with a broken header
        raise DecodeRejected(reasons.DECODE_ERROR, f"{type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > config.max_pixels:
        image.close()
        raise DecodeRejected(reasons.TOO_MANY_PIXELS, f"{width}x{height} > {config.max_pixels} px")
    return image


def _oriented_size(image: Image.Image) -> tuple[int, int, int]:
    try:
        orientation = int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block is not a broken image
        orientation = 1
    width, height = image.size
    return (height, width, orientation) if orientation in _TRANSPOSED else (width, height, orientation)


def _decode_rgb(image: Image.Image, config: DecodeConfig, size: tuple[int, int], orientation: int):
    """Decode the first frame (JPEG: draft-scaled), oriented, as 8-bit RGB."""
    target = _draft_target(config, size)
    if image.format in ("JPEG", "MPO"):
        # draft() picks the largest DCT scale (1/1 .. 1/8) that stays >= target; it wants
        # the size in stored (pre-orientation) terms.
        stored = target[::-1] if orientation in _TRANSPOSED else target
        image.draft("RGB", stored)
    try:
        image.seek(0)
        image.load()
        oriented = ImageOps.exif_transpose(image) if orientation != 1 else image
        return to_rgb(oriented)
    except Image.DecompressionBombError as e:
        raise DecodeRejected(reasons.TOO_MANY_PIXELS, str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeRejected(reasons.DECODE_ERROR, f"{type(e).__name__}: {e}") from e


def _draft_target(config: DecodeConfig, size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if config.resize_mode == "none":
        return (max(1, width // 8), max(1, height // 8))  # validate the stream cheaply
    scale = min(1.0, config.image_size / min(width, height))
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha onto white, 16-bit scaled down, CMYK/palette converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I") and array.max(initial=0) > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _resized_jpeg(image: Image.Image, config: DecodeConfig) -> bytes:
    width, height = image.size
    scale = config.image_size / min(width, height)
    if scale < 1.0 or not config.resize_only_if_bigger:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BICUBIC,
                             reducing_gap=None)
    if config.resize_mode == "center_crop":
        side = min(image.size + (config.image_size,))
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=config.jpeg_quality)
    return out.getvalue()


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML document, not an image"
    return f"unknown format; first bytes {data[:16]!r}"
