"""Odd and hostile image files, generated here, with the verdict every decode site must give.

`CASES` maps a name to `Case(data, ext, reason)`: the bytes, the extension a download shard
would store them under (`jpg` for junk served as an image), and the reason of
pipeline/core/reasons.py that every entry point must give (None: decodes). Formats this
Pillow cannot write are left out of `CASES` (see `SKIPPED`).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

# A short side of at least 64 keeps the download stage's default min_size out of the way.
SIZE = (96, 72)


@dataclass(frozen=True)
class Case:
    data: bytes
    ext: str
    reason: str | None


def stripes(size: tuple[int, int] = SIZE) -> Image.Image:
    """Top third red, middle green, bottom blue: its orientation can be read back."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 3, :, 0] = 255
    array[height // 3 : 2 * height // 3, :, 1] = 255
    array[2 * height // 3 :, :, 2] = 255
    return Image.fromarray(array)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk(image: Image.Image, kind: bytes, body: bytes) -> bytes:
    """A PNG with one extra chunk right after IHDR (8-byte signature + 25-byte IHDR)."""
    data = encoded(image, "PNG")
    return data[:33] + _chunk(kind, body) + data[33:]


def pixel_bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header claiming width x height pixels, with a tiny IDAT: a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A JPEG APP1 EXIF block (little-endian TIFF inside): entries of (tag, type, count, 4-byte value field)."""
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 32


def rotated_jpeg(upright: Image.Image, orientation: int = 6, broken: bool = False) -> bytes:
    """`upright` stored sideways with EXIF orientation 6 (or 8), so that it shows upright.

    broken: the EXIF block also has a Software tag typed RATIONAL, as some camera firmware
    writes; Pillow reads the block, but ImageOps.exif_transpose raises AttributeError when it
    re-serialises it."""
    turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0))]
    if broken:
        entries.append((0x0131, 5, 1, struct.pack("<I", 26 + 12)))  # -> 8 bytes of padding
    return encoded(upright.transpose(turn), "JPEG", quality=95, exif=exif_block(entries))


def palette_with_transparency() -> bytes:
    image = stripes().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    corner = image.getpixel((0, 0))
    return encoded(image, "PNG", transparency=corner)  # the red band's index is transparent


def animated_gif() -> bytes:
    frames = [Image.new("RGB", SIZE, colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def gray16_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, SIZE[0]).astype(np.uint16), (SIZE[1], 1))
    return encoded(Image.fromarray(ramp), "PNG")


def png_with_bad_crc() -> bytes:
    data = bytearray(encoded(stripes(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # inside the compressed pixels: CRC and zlib both break
    return bytes(data)


def _optional(fmt: str, feature: str | None) -> bool:
    return feature is None or bool(features.check(feature))


def _cases() -> tuple[dict[str, Case], list[str]]:
    photo = stripes()
    jpeg = encoded(photo, "JPEG", quality=95)
    cases = {
        "broken_exif_png": Case(png_with_chunk(photo, b"eXIf", b"garbage!"), "png", None),
        "broken_exif_rotated_jpeg": Case(rotated_jpeg(photo, 6, broken=True), "jpg", None),
        "exif_rotated_jpeg": Case(rotated_jpeg(photo, 8), "jpg", None),
        "truncated_jpeg": Case(jpeg[: len(jpeg) // 2], "jpg", "decode_error"),
        "cmyk_jpeg": Case(encoded(photo.convert("CMYK"), "JPEG"), "jpg", None),
        "gray16_png": Case(gray16_png(), "png", None),
        "palette_transparency_png": Case(palette_with_transparency(), "png", None),
        "la_png": Case(encoded(photo.convert("LA"), "PNG"), "png", None),
        "animated_gif": Case(animated_gif(), "gif", None),
        "pixel_bomb_png": Case(pixel_bomb_png(), "png", "too_many_pixels"),
        "png_bad_crc": Case(png_with_bad_crc(), "png", "decode_error"),
        "gif_garbage": Case(b"GIF89a\x00\x00garbage", "gif", "decode_error"),
        "tiff_garbage": Case(b"II*\x00" + b"\xff" * 40, "tif", "decode_error"),
        "html": Case(b"<!DOCTYPE html><html><body>moved</body></html>", "jpg", "not_an_image"),
        "svg": Case(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "jpg",
                    "not_an_image"),
        "pcx_not_stored": Case(encoded(photo, "PCX"), "jpg", "not_an_image"),  # outside the table
        "empty": Case(b"", "jpg", "empty_body"),
        "ico": Case(encoded(photo, "ICO", sizes=[(64, 64)]), "ico", None),
        "bmp": Case(encoded(photo, "BMP"), "bmp", None),
        "ppm": Case(encoded(photo, "PPM"), "ppm", None),
        "pgm": Case(encoded(photo.convert("L"), "PPM"), "ppm", None),
        "tiff": Case(encoded(photo, "TIFF", compression="tiff_lzw"), "tif", None),
    }
    optional = {"webp": ("WEBP", "webp"), "avif": ("AVIF", "avif"), "jp2": ("JPEG2000", "jpg_2000")}
    skipped = []
    for ext, (fmt, feature) in optional.items():
        if _optional(fmt, feature):
            cases[ext] = Case(encoded(photo, fmt), ext, None)
        else:
            skipped.append(fmt)
    return cases, skipped


CASES, SKIPPED = _cases()
