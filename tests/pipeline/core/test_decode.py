"""The one decode module: header checks before decode, EXIF, modes to RGB, first frame, the
extension table, and one verdict (a reason, never a crash) from both entry points."""

from __future__ import annotations

import io
import random
import time
import warnings

import download_assets as assets
import hostile_images as hostile
import numpy as np
import pytest
from PIL import Image

from pipeline.core import reasons
from pipeline.core.decode import (
    FORMAT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DecodeConfig,
    ImageRejected,
    decode_for_model,
    original_image_key,
    validate_download,
)

pytestmark = pytest.mark.timeout(60)
CONFIG = DecodeConfig(min_size=32, image_size=64, resize_mode="keep_ratio")
# The table's own config: no minimum size, the same draft scale as decode_for_model(data, 64).
TABLE_CONFIG = DecodeConfig(min_size=1, image_size=64)


def resized(data: bytes, config: DecodeConfig = CONFIG) -> tuple[Image.Image, object]:
    decoded = validate_download(data, config)
    image = decode_for_model(decoded.resized_jpeg, None).image  # full size
    return image, decoded


def rejection(data: bytes, config: DecodeConfig = CONFIG) -> str:
    with pytest.raises(ImageRejected) as info:
        validate_download(data, config)
    return info.value.reason


def verdicts(data: bytes) -> tuple[str | None, str | None]:
    """(validate_download's reason, decode_for_model's reason); None where it decoded."""
    out = []
    for decode in (lambda: validate_download(data, TABLE_CONFIG), lambda: decode_for_model(data, 64)):
        try:
            decode()
            out.append(None)
        except ImageRejected as e:
            out.append(e.reason)
    return out[0], out[1]


@pytest.mark.parametrize("name", sorted(hostile.CASES))
def test_every_odd_input_gets_the_same_verdict_from_both_entry_points(name):
    case = hostile.CASES[name]
    assert verdicts(case.data) == (case.reason, case.reason)
    if case.reason is None:
        decoded = decode_for_model(case.data, 64)
        assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == decoded.image.size
        stored = validate_download(case.data, TABLE_CONFIG)
        assert stored.format == case.ext and (stored.width, stored.height) == decoded.image.size
    else:
        assert case.reason in vars(reasons).values()  # one reason table for the whole run


def test_the_reasons_say_what_went_wrong():
    with pytest.raises(ImageRejected, match="HTML"):
        decode_for_model(hostile.CASES["html"].data, 64)
    with pytest.raises(ImageRejected, match="Truncated|truncated|broken"):
        decode_for_model(hostile.CASES["truncated_jpeg"].data, 64)


def _red_green_blue_from_top(image: Image.Image) -> bool:
    """The stripes of hostile_images.stripes(), upright: red on top, blue at the bottom."""
    array = np.asarray(image).astype(int)
    third = array.shape[0] // 3
    top, bottom = array[: third - 2].reshape(-1, 3).mean(0), array[-third + 2 :].reshape(-1, 3).mean(0)
    return top[0] > 200 > 60 > top[2] and bottom[2] > 200 > 60 > bottom[0]


@pytest.mark.parametrize("name", ["broken_exif_rotated_jpeg", "exif_rotated_jpeg"])
def test_exif_orientation_is_applied_even_when_the_block_is_broken(name):
    # Stored 72 wide x 96 high; the EXIF orientation turns it upright: 96 x 72, red on top.
    decoded = decode_for_model(hostile.CASES[name].data, 64)
    assert (decoded.width, decoded.height) == (96, 72) and decoded.image.size == (96, 72)
    assert _red_green_blue_from_top(decoded.image)


def test_broken_exif_png_is_decoded_as_stored():
    decoded = decode_for_model(hostile.CASES["broken_exif_png"].data, 64)
    assert _red_green_blue_from_top(decoded.image)


def test_draft_mode_with_exif_rotation_decodes_small_and_upright():
    upright = hostile.stripes((1200, 1600))  # shown 1200 wide x 1600 high
    data = hostile.rotated_jpeg(upright, orientation=8)  # stored 1600 x 1200
    decoded = decode_for_model(data, 150)
    assert (decoded.width, decoded.height) == (1200, 1600)  # the full original, upright
    assert decoded.image.size == (150, 200)  # 1/8 DCT scale: the smallest covering 150
    assert _red_green_blue_from_top(decoded.image)
    # A size rule gets the upright size and asks in upright terms.
    seen = []
    ruled = decode_for_model(data, lambda w, h: seen.append((w, h)) or (300, 400))
    assert seen == [(1200, 1600)] and ruled.image.size == (300, 400)  # 1/4 scale


def test_non_jpeg_formats_ignore_the_draft_size():
    decoded = decode_for_model(hostile.encoded(hostile.stripes((400, 300)), "PNG"), 16)
    assert decoded.image.size == (400, 300)


def test_palette_transparency_and_la_are_composited_on_white():
    palette = decode_for_model(hostile.CASES["palette_transparency_png"].data, 64).image
    assert np.asarray(palette)[:10].min() > 240  # the transparent red band -> white
    assert np.asarray(palette)[-10:, :, 2].mean() > 200  # the opaque blue band stays blue
    la = hostile.stripes().convert("LA")
    la.putalpha(0)
    assert np.asarray(decode_for_model(hostile.encoded(la, "PNG"), 64).image).min() == 255


def test_animated_gif_gives_its_first_frame_and_counts_frames():
    data = hostile.CASES["animated_gif"].data
    assert validate_download(data, TABLE_CONFIG).frames == 3
    red, green, blue = np.asarray(decode_for_model(data, 32).image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 40 and blue < 40


def test_extension_table_covers_every_stored_format_and_the_tar_readers_find_them():
    stored = {c.ext for c in hostile.CASES.values() if c.reason is None}
    assert stored <= set(FORMAT_EXTENSIONS.values()) <= IMAGE_EXTENSIONS
    for ext in IMAGE_EXTENSIONS:
        assert original_image_key(f"shard/abc123.{ext}") == "abc123"
        assert original_image_key(f"abc123.{ext.upper()}") == "abc123"
    for name in ("abc123.json", "abc123.resized.jpg", "abc123.txt", ".jpg", "abc123"):
        assert original_image_key(name) is None, name


def test_hostile_mutations_give_a_reason_never_another_exception():
    """Random byte flips and cuts of valid files in every stored format: each decodes or is
    rejected with a reason, the same from both entry points."""
    rng = random.Random(0)
    seeds = [c.data for c in hostile.CASES.values() if c.reason is None]
    seen: set[str | None] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt EXIF it tolerates
        for trial in range(400):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if trial % 3 == 0:
                data = data[: rng.randrange(1, len(data))]
            first, second = verdicts(bytes(data))  # any other exception fails the test
            assert first == second, (trial, first, second)
            seen.add(first)
    assert None in seen and "decode_error" in seen  # the mutations did break some files


# --- the download stage's rules: resized copy, min size, cap, modes -----------------------


def test_photo_keeps_size_format_and_resized_copy_is_rgb_jpeg():
    image, decoded = resized(assets.jpeg(assets.photo("coffee")))  # 600 x 400
    assert (decoded.format, decoded.width, decoded.height) == ("jpg", 600, 400)
    assert Image.open(io.BytesIO(decoded.resized_jpeg)).format == "JPEG" and image.mode == "RGB"
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


def test_huge_header_is_refused_before_decoding():
    start = time.perf_counter()
    assert rejection(assets.png_header_only(60000, 60000)) == "too_many_pixels"
    with pytest.raises(ImageRejected, match="too_many_pixels"):
        decode_for_model(assets.png_header_only(9000, 9000), 64, max_pixels=10**7)
    # no gigabyte decode was attempted (that takes many seconds; margin for a loaded machine)
    assert time.perf_counter() - start < 3.0


def test_pixel_cap_is_ours_not_only_pillows():
    config = DecodeConfig(max_pixels=100_000, min_size=16, image_size=64)
    assert rejection(assets.jpeg(assets.photo("coffee")), config) == "too_many_pixels"


def test_truncated_jpeg_is_a_decode_error_at_every_draft_scale():
    data = assets.jpeg(assets.photo("astronaut"))
    assert rejection(data[: len(data) // 2]) == "decode_error"
    # Also without a resized copy (validation-only decode at 1/8 scale).
    assert rejection(data[: len(data) // 2], DecodeConfig(resize_mode="none")) == "decode_error"


def test_too_small():
    assert rejection(assets.png(Image.new("RGB", (16, 100)))) == "too_small"


def test_no_resize_mode_validates_without_a_copy():
    decoded = validate_download(assets.jpeg(assets.photo("astronaut")), DecodeConfig(resize_mode="none"))
    assert decoded.resized_jpeg is None and (decoded.width, decoded.height) == (512, 512)
