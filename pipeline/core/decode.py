"""The one image decode module: every stage that turns image bytes into pixels comes here.

Two entry points share one path, so an image gets the same verdict wherever it is read:
`validate_download` (the download stage: validation plus the resized JPEG copy it stores) and
`decode_for_model` (score, caption, encode, dedup, the autoencoder, the demo report: the
upright RGB image at about the size the consumer needs, plus the original size).

The rules, in order:
1. The header only: `Image.open` parses it, restricted to the formats of `FORMAT_EXTENSIONS`
   (PostScript, PSD, FITS, ... are `not_an_image`: the web does not serve them as images,
   and each extra parser is attack surface). The pixel cap (`too_many_pixels`) is checked
   from the header, so a 60000 x 60000 PNG header costs microseconds, not gigabytes.
2. One decode of the first frame, JPEGs in draft mode straight to the smallest DCT scale
   (1/1 .. 1/8) that still covers the size needed. Truncated data fails as `decode_error`.
3. EXIF orientation is applied by a plain transpose; an EXIF block that cannot be read (or
   an orientation outside 1..8) counts as "no rotation": a broken EXIF block is not a
   broken image. (Pillow's `ImageOps.exif_transpose` re-serialises the EXIF and raises
   AttributeError, struct.error, ... on blocks real cameras write.)
4. `to_rgb`: CMYK, 16-bit, palette and alpha images become 8-bit RGB, alpha on white.
Any failure is an `ImageRejected` carrying a reason from pipeline/core/reasons.py: Pillow
raises OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, ... on hostile
files, so the boundary catches broadly. Only MemoryError passes: it says the worker is out
of memory, not that the image is bad, and recording it as a reason would drop the sample
for good. Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) stays in force; when it fires
first it is reported as `too_many_pixels` too.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core import reasons

# Pillow format -> file extension of the original bytes in a download shard (`<uid>.<ext>`).
# The download stage stores only these formats, so this table is also what readers of
# download tars look for.
FORMAT_EXTENSIONS = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "AVIF": "avif",
    "BMP": "bmp", "TIFF": "tif", "ICO": "ico", "PPM": "ppm", "JPEG2000": "jp2",
    "HEIF": "heic",  # only where the pillow-heif plugin is registered
}  # fmt: skip
# Extensions other writers use for the same formats (user folders and WebDatasets).
_OTHER_SPELLINGS = {"jpeg", "jpe", "jfif", "tiff", "pbm", "pgm", "pnm", "j2k", "jpx", "heif"}
IMAGE_EXTENSIONS = frozenset(FORMAT_EXTENSIONS.values()) | _OTHER_SPELLINGS
DEFAULT_MAX_PIXELS = 100_000_000  # for readers with no configured cap (dedup, autoencoder)

# Signatures of the stored formats: bytes Pillow cannot parse behind one of these are a broken
# image (`decode_error`), anything else is `not_an_image`.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*", b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")
_JPEG_FORMATS = ("JPEG", "MPO")
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = {5, 6, 7, 8}  # orientations that rotate by 90 or 270 degrees
_ORIENTATION_TAG = 0x0112
_DETAIL_CHARS = 300

# The size a consumer needs, from the upright original (width, height): draft mode decodes
# a JPEG at the smallest DCT scale whose both sides still cover it.
SizeRule = Callable[[int, int], tuple[int, int]]


class ImageRejected(Exception):
    """Bytes that do not give a usable image; `reason` is the drop class (reasons.py)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodeConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS  # width * height from the header, checked first
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
class ValidatedDownload:
    """What the download stage records about an image it accepted."""

    format: str  # file extension of the original bytes (FORMAT_EXTENSIONS)
    width: int  # after EXIF orientation, full resolution
    height: int
    frames: int
    resized_jpeg: bytes | None  # the resized copy when configured


@dataclass
class DecodedImage:
    """A decoded model input."""

    image: Image.Image  # upright 8-bit RGB, covering the size asked for when the original does
    width: int  # of the full original, after EXIF orientation
    height: int


def validate_download(data: bytes, config: DecodeConfig) -> ValidatedDownload:
    """Check and decode downloaded bytes once; raises ImageRejected with a reason."""
    with _rejections():
        image = _open_header(data, config.max_pixels)
        with image:
            if min(image.size) < config.min_size:  # the short side: orientation does not matter
                raise ImageRejected(reasons.TOO_SMALL, f"{image.size} < {config.min_size}")
            rgb, (width, height) = _decode_upright(image, lambda w, h: _draft_size(config, w, h))
            resized = _resized_jpeg(rgb, config) if config.resize_mode != "none" else None
            return ValidatedDownload(FORMAT_EXTENSIONS[image.format], width, height,
                                     _frame_count(image), resized)


def decode_for_model(
    data: bytes, target: int | SizeRule | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Upright RGB of `data`, decoded at about `target` pixels on the short side, or the
    (width, height) a SizeRule gives, or in full (None); raises ImageRejected with a reason."""
    rule = target if callable(target) or target is None else (lambda w, h: (target, target))
    with _rejections():
        image = _open_header(data, max_pixels)
        rgb, (width, height) = _decode_upright(image, rule)
        return DecodedImage(rgb, width, height)


def original_image_key(member_name: str) -> str | None:
    """The uid of a tar member that is an original image (`<uid>.<ext>`); None for metadata
    (`.json`) and derived copies (`<uid>.resized.jpg`)."""
    key, _, ext = member_name.rpartition("/")[2].partition(".")
    return key if key and ext.lower() in IMAGE_EXTENSIONS else None


@contextmanager
def _rejections() -> Iterator[None]:
    """The exception boundary: every failure while decoding becomes an ImageRejected."""
    try:
        yield
    except (ImageRejected, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(reasons.TOO_MANY_PIXELS, str(e)[:_DETAIL_CHARS]) from e
    except Exception as e:  # noqa: BLE001 -- Pillow raises a dozen types on hostile files
        raise ImageRejected(reasons.DECODE_ERROR, f"{type(e).__name__}: {e}"[:_DETAIL_CHARS]) from e


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected(reasons.EMPTY_BODY, "no bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=_stored_formats())
    except UnidentifiedImageError as e:
        # An image signature that Pillow cannot parse is a broken image, not another format.
        if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
            raise ImageRejected(reasons.DECODE_ERROR, f"corrupt image header {data[:12]!r}") from e
        raise ImageRejected(reasons.NOT_AN_IMAGE, _sniff(data)) from e
    # Nothing is decoded yet, and the image only holds a BytesIO: no file to close.
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(reasons.TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} px")
    if width < 1 or height < 1:  # nothing downstream can resize or crop an empty image
        raise ImageRejected(reasons.DECODE_ERROR, f"empty {width}x{height} image")
    return image


def _stored_formats() -> list[str]:
    """The table's formats that this Pillow can open (HEIF needs a plugin, MPO opens as JPEG);
    Image.open raises KeyError for a format name it does not know."""
    Image.init()  # registers every plugin once; a no-op afterwards
    return [name for name in FORMAT_EXTENSIONS if name in Image.OPEN]


def _decode_upright(
    image: Image.Image, rule: SizeRule | None
) -> tuple[Image.Image, tuple[int, int]]:
    """(first frame as upright RGB, upright full size); JPEGs decoded at about `rule`'s size."""
    stored = image.size
    jpeg = image.format in _JPEG_FORMATS
    orientation = _orientation(image) if jpeg else 1  # a JPEG's EXIF is in its header
    if jpeg and rule is not None:
        # draft() wants the size in stored (pre-orientation) terms.
        needed = rule(*_upright_size(stored, orientation))
        image.draft("RGB", needed[::-1] if orientation in _SWAPS_AXES else needed)
    image.load()  # the first frame; reads every byte of its stream
    if not jpeg:
        orientation = _orientation(image)  # PNG's eXIf chunk may follow the pixels
    rgb = to_rgb(image)
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return rgb, _upright_size(stored, orientation)


def _frame_count(image: Image.Image) -> int:
    """Frames of an animation (GIFs count by seeking through them, so after the decode).
    A broken later frame is not a broken image: every consumer uses the first frame only."""
    try:
        return int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 -- whatever the later frames raise
        return 1


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation 1..8; 1 when the EXIF block is missing, unreadable or nonsense."""
    try:
        value = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block is not a broken image
        return 1
    return value if value in _UPRIGHT else 1


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _SWAPS_AXES else size


def _draft_size(config: DecodeConfig, width: int, height: int) -> tuple[int, int]:
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
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML document, not an image"
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in head:
        return "SVG (vector graphics are not decoded)"
    return f"not a supported image format; first bytes {data[:16]!r}"
