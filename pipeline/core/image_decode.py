"""Decode an image once, at about the size a model needs, into upright 8-bit RGB.

The download stage (pipeline/core/decode.py) validates images and writes resized JPEG copies;
this is the model-input side used by score: it returns the decoded image itself.

JPEGs are decoded with Pillow's draft mode straight to the smallest DCT scale (1/2 .. 1/8)
that still covers the target size, which skips most of the work on large photos. The pixel
cap is checked from the header before any pixel is decoded. EXIF orientation is applied;
palette, alpha, CMYK and 16-bit images become RGB; animated images give their first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from pipeline.core import reasons
from pipeline.core.decode import to_rgb  # the download stage's: one conversion rule for the run

ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is the snake_case drop class."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodedImage:
    image: Image.Image  # upright RGB, short side >= target when the original allows it
    width: int  # of the full original, after EXIF orientation
    height: int


def decode_image(data: bytes, target: int, max_pixels: int) -> DecodedImage:
    """Decode `data` for a model whose input is `target` pixels square."""
    if not data:
        raise ImageRejected(reasons.DECODE_ERROR, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(reasons.TOO_MANY_PIXELS, f"{width}x{height}")
                orientation = img.getexif().get(ORIENTATION_TAG, 1)
                img.draft("RGB", (target, target))
                upright = ImageOps.exif_transpose(img)  # also forces the (draft) decode
                rgb = to_rgb(upright)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own header check (Image.MAX_IMAGE_PIXELS) fired before ours could.
        raise ImageRejected(reasons.TOO_MANY_PIXELS, str(e)[:200]) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageRejected(reasons.DECODE_ERROR, str(e)[:200]) from e
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return DecodedImage(rgb, width, height)
