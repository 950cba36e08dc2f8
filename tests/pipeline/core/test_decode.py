"""Safe decoding: header checks before decode, EXIF, modes to RGB, first frame, reasons."""

from __future__ import annotations

import io
import time

import download_assets as assets
import numpy as np
import pytest
from PIL import Image

from pipeline.core.decode import DecodeConfig, DecodeRejected, decode_image

pytestmark = pytest.mark.timeout(60)
CONFIG = DecodeConfig(min_size=32, image_size=64, resize_mode="keep_ratio")


def resized(data: bytes, config: DecodeConfig = CONFIG) -> tuple[Image.Image, object]:
    decoded = decode_image(data, config)
    image = Image.open(io.BytesIO(decoded.resized_jpeg))
    image.load()
    return image, decoded


def rejection(data: bytes, config: DecodeConfig = CONFIG) -> str:
    with pytest.raises(DecodeRejected) as info:
        decode_image(data, config)
    return info.value.reason


def test_photo_keeps_size_format_and_resized_copy_is_rgb_jpeg():
    image, decoded = resized(assets.jpeg(assets.photo("coffee")))  # 600 x 400
    assert (decoded.format, decoded.width, decoded.height) == ("jpg", 600, 400)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (96, 64)  # shorter side -> image_size, aspect kept


def test_center_crop_gives_a_square():
    config = DecodeConfig(min_size=32, image_size=64, resize_mode="center_crop")
    image, _ = resized(assets.jpeg(assets.photo("coffee")), config)
    assert image.size == (64, 64)


def test_exif_orientation_is_applied():
    image, decoded = resized(assets.rotated_jpeg())
    # Stored 300 wide x 451 high with orientation 6: shown 451 wide x 300 high.
    assert (decoded.width, decoded.height) == (451, 300)
    assert image.size[0] > image.size[1]
    # Upright again: the copy matches the original photo's layout, not the stored one.
    reference = assets.photo("chelsea").resize(image.size).convert("L")
    error = np.abs(np.asarray(image.convert("L"), float) - np.asarray(reference, float)).mean()
    assert error < 20


def test_cmyk_becomes_rgb():
    image, decoded = resized(assets.jpeg(assets.photo("coffee").convert("CMYK")))
    assert image.mode == "RGB" and decoded.format == "jpg"
    assert np.asarray(image).mean() > 40  # not an inverted, near-black image


def test_16bit_grayscale_is_scaled_not_clipped():
    image, decoded = resized(assets.gray16_png())
    assert decoded.format == "png" and image.mode == "RGB"
    array = np.asarray(image)
    # Clipping 16-bit values at 255 would make almost everything white.
    assert 60 < array.mean() < 200
    expected = np.asarray(assets.photo("camera").resize(image.size))
    assert np.abs(array[..., 0].astype(float) - expected).mean() < 20


def test_alpha_is_composited_on_white():
    config = DecodeConfig(min_size=32, image_size=80, resize_only_if_bigger=True)
    image, _ = resized(assets.transparent_png(), config)
    array = np.asarray(image).astype(int)
    assert (array[:, :50] > 235).all()  # transparent half -> white
    assert array[:, 70:, 0].mean() > 180 and array[:, 70:, 1].mean() < 40  # opaque red stays


def test_palette_png_becomes_rgb():
    image, _ = resized(assets.png(assets.photo("astronaut").convert("P")))
    assert image.mode == "RGB"


def test_animated_gif_gives_its_first_frame():
    image, decoded = resized(assets.animated_gif())
    assert decoded.frames == 3 and decoded.format == "gif"
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 40 and blue < 40  # frame 0 is red


def test_huge_header_is_refused_before_decoding():
    start = time.perf_counter()
    assert rejection(assets.png_header_only(60000, 60000)) == "too_many_pixels"
    assert time.perf_counter() - start < 0.5  # no 10 GB decode was attempted


def test_pixel_cap_is_ours_not_only_pillows():
    config = DecodeConfig(max_pixels=100_000, min_size=16, image_size=64)
    assert rejection(assets.jpeg(assets.photo("coffee")), config) == "too_many_pixels"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty_body"),
        (b"<!DOCTYPE html><html></html>", "not_an_image"),
        (b"GIF89a\x00\x00garbage", "decode_error"),
    ],
)
def test_bad_payloads(payload, reason):
    assert rejection(payload) == reason


def test_truncated_jpeg_is_a_decode_error():
    data = assets.jpeg(assets.photo("astronaut"))
    assert rejection(data[: len(data) // 2]) == "decode_error"
    # Also without a resized copy (validation-only decode at 1/8 scale).
    assert rejection(data[: len(data) // 2], DecodeConfig(resize_mode="none")) == "decode_error"


def test_too_small():
    assert rejection(assets.png(Image.new("RGB", (16, 100)))) == "too_small"


def test_no_resize_mode_validates_without_a_copy():
    decoded = decode_image(assets.jpeg(assets.photo("astronaut")), DecodeConfig(resize_mode="none"))
    assert decoded.resized_jpeg is None and (decoded.width, decoded.height) == (512, 512)
