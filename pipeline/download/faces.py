"""Face blurring at download (`download.blur_faces`), for lists that ship face boxes (DataComp).

DataComp's `face_bboxes` are [x0, y0, x1, y1] in coordinates relative to the image (0..1);
DataComp's own download (img2dataset's BoundingBoxBlurrer) widens each box by 10% of the
largest box side on every side and applies a Gaussian blur with sigma = 0.1 * that side.
Here the same margin and sigma are used, with a hard edge instead of img2dataset's blurred
mask, so exactly the widened boxes change and no pixel outside them does.

The stored image is the blurred one, re-encoded in its own format (JPEG at
`decode.jpeg_quality`, which re-quantizes the pixels outside the boxes too; PNG and WebP
lossless as PNG/lossless WebP; any other format as PNG); `download_sha256` and
`download_bytes` then describe the stored bytes, not the server's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageFilter, ImageOps

_MARGIN = 0.1  # of the largest box side, on each side (img2dataset / ImageNet face obfuscation)
_SIGMA = 0.1  # of the largest box side


def pixel_boxes(boxes: Sequence[Sequence[float]], width: int, height: int
                ) -> tuple[list[tuple[int, int, int, int]], int]:
    """Relative boxes as widened, clipped pixel boxes (x0, y0, x1, y1), end exclusive, and
    the largest box side before widening (what margin and sigma scale with)."""
    boxes = [b for b in boxes if b is not None and len(b) == 4]
    scaled = [(int(b[0] * width), int(b[1] * height), int(b[2] * width), int(b[3] * height))
              for b in boxes]
    side = max((max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in scaled), default=0)
    pad = int(_MARGIN * side)
    out = []
    for x0, y0, x1, y1 in scaled:
        box = (max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad))
        if box[2] > box[0] and box[3] > box[1]:
            out.append(box)
    return out, side


def blur_faces(data: bytes, boxes: Sequence[Sequence[float]], jpeg_quality: int) -> tuple[bytes, int]:
    """The image with its face boxes blurred, re-encoded, and how many boxes were blurred.

    `data` has already passed the download's checks (pipeline.core.decode), so it decodes."""
    with Image.open(io.BytesIO(data)) as opened:
        source_format = opened.format
        image = ImageOps.exif_transpose(opened)  # boxes are relative to the upright image
    image.load()
    pixels, side = pixel_boxes(boxes, image.width, image.height)
    if not pixels:
        return data, 0
    sigma = max(1.0, _SIGMA * side)
    reach = math.ceil(3 * sigma)  # blur a margin around each box so its edge sees real pixels
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info
                              else "RGB")
    for x0, y0, x1, y1 in pixels:
        outer = (max(0, x0 - reach), max(0, y0 - reach),
                 min(image.width, x1 + reach), min(image.height, y1 + reach))
        blurred = image.crop(outer).filter(ImageFilter.GaussianBlur(sigma))
        inner = (x0 - outer[0], y0 - outer[1], x1 - outer[0], y1 - outer[1])
        image.paste(blurred.crop(inner), (x0, y0))
    out = io.BytesIO()
    if source_format == "JPEG":
        image.convert("RGB").save(out, "JPEG", quality=jpeg_quality)
    elif source_format == "WEBP":
        image.save(out, "WEBP", lossless=True)
    else:
        image.save(out, "PNG")
    return out.getvalue(), len(pixels)
