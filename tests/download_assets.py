"""Real photos (scikit-image) and every bad input the download stage must classify.

`write_image_site(root)` writes the files a LocalImageServer serves; `CASES` maps a URL path
on that server (or an absolute URL) to the reason the download must end with (None: success).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

# Short timeouts keep the slow-server cases fast: drip/sleep routes last 3 s.
SLOW_DRIP = "drip/3/astronaut.jpg"  # every recv is quick; only the total deadline catches it
SLOW_HEADERS = "sleep/3/astronaut.jpg"

CASES: dict[str, str | None] = {
    "astronaut.jpg": None,
    "coffee.jpg": None,
    "chelsea.png": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "transparent.png": None,
    "animated.gif": None,
    "rotated.jpg": None,
    "palette.png": None,
    "redirect/2/coffee.jpg": None,
    "robots/otherbot%3A%20noai/coffee.jpg": None,  # scoped to another crawler
    "truncated.jpg": "decode_error",
    "empty.jpg": "empty_body",
    "page.jpg": "not_an_image",
    "huge.png": "too_many_pixels",
    "tiny.png": "too_small",
    "missing.jpg": "http_404",
    "status/500": "http_500",
    "status/429?retry_after=7": "http_429",
    SLOW_DRIP: "timeout",
    SLOW_HEADERS: "timeout",
    "redirect-loop": "redirect_loop",
    "robots/noai/astronaut.jpg": "robots_opt_out",
    "robots/noimageai%2C%20nofollow/astronaut.jpg": "robots_opt_out",
    "goto?url=http%3A%2F%2F10.1.2.3%2Fx.jpg": "blocked_address",  # redirect to a private IP
    "http://10.0.0.1/x.jpg": "blocked_address",
    "http://169.254.169.254/latest/meta-data/": "blocked_address",
    "http://[::ffff:192.168.0.1]/x.jpg": "blocked_address",
    "http://no-such-host.invalid/x.jpg": "dns",
    "ftp://127.0.0.1/x.jpg": "unsupported_scheme",
}


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **kwargs)
    return out.getvalue()


def png(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **kwargs)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG claiming width x height in its IHDR, with one tiny IDAT: a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def rotated_jpeg() -> bytes:
    """Chelsea (451 wide x 300 high) stored sideways with EXIF orientation 6 (rotate 90 CW)."""
    stored = photo("chelsea").transpose(Image.Transpose.ROTATE_90)  # 300 wide x 451 high
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(stored, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (96, 80), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def transparent_png() -> bytes:
    rgba = np.zeros((80, 120, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 60:, 3] = 255
    return png(Image.fromarray(rgba, "RGBA"))


def gray16_png() -> bytes:
    camera = skdata.camera().astype(np.uint16) * 257  # full 16-bit range
    return png(Image.fromarray(camera))


def write_image_site(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    astronaut = jpeg(photo("astronaut"))
    files = {
        "astronaut.jpg": astronaut,
        "coffee.jpg": jpeg(photo("coffee")),
        "chelsea.png": png(photo("chelsea")),
        "cmyk.jpg": jpeg(photo("coffee").convert("CMYK")),
        "gray16.png": gray16_png(),
        "transparent.png": transparent_png(),
        "animated.gif": animated_gif(),
        "rotated.jpg": rotated_jpeg(),
        "palette.png": png(photo("astronaut").convert("P")),
        "truncated.jpg": astronaut[: len(astronaut) // 2],
        "empty.jpg": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>not found, but 200</body></html>",
        "huge.png": png_header_only(60000, 60000),
        "tiny.png": png(Image.new("RGB", (16, 16), (9, 9, 9))),
    }
    for name, payload in files.items():
        (root / name).write_bytes(payload)
    return root


def case_url(server_base: str, case: str) -> str:
    return case if "://" in case else f"{server_base}/{case}"
