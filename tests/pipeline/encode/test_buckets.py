"""Aspect buckets: shapes, assignment, cover-and-centre-crop, draft decoding, EXIF orientation."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.encode.buckets import (
    BucketConfig,
    cover_crop_box,
    load_bucketed,
    make_buckets,
    nearest_bucket,
    to_vae_input,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("resolution,multiple", [(256, 32), (1024, 64), (1024, 32)])
def test_buckets_have_about_the_target_area_and_valid_sides(resolution, multiple):
    config = BucketConfig(resolution=resolution, multiple=multiple, max_aspect=4.0)
    buckets = make_buckets(config)
    assert (resolution, resolution) in buckets
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert 0.9 * resolution**2 <= h * w <= resolution**2
        assert max(h, w) / min(h, w) <= 4.0
        assert (w, h) in buckets  # both orientations
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects) and len(set(aspects)) == len(aspects)


def test_bad_bucket_config_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        BucketConfig(multiple=24)
    with pytest.raises(ValueError, match="max_aspect"):
        BucketConfig(max_aspect=0.5)


def test_nearest_bucket_is_nearest_in_log_aspect():
    buckets = make_buckets(BucketConfig(resolution=256, multiple=32))
    assert nearest_bucket(1000, 1000, buckets) == (256, 256)
    assert nearest_bucket(300, 1200, buckets) == (128, 512)  # 4:1 wide
    assert nearest_bucket(1920, 1080, buckets) == (320, 192)  # 16:9 portrait -> 5:3
    assert nearest_bucket(100, 10_000, buckets) == (128, 512)  # beyond the widest: clamp


def test_cover_crop_box_keeps_the_bucket_aspect_and_is_centred():
    left, top, right, bottom = cover_crop_box(600, 800, (256, 256))
    assert (right - left, bottom - top) == pytest.approx((600, 600))
    assert left == pytest.approx(100) and top == 0
    left, top, right, bottom = cover_crop_box(1000, 500, (384, 160))
    assert (right - left) / (bottom - top) == pytest.approx(160 / 384)
    assert (top, bottom) == (0, 1000)  # narrower bucket: full height, width cut and centred
    assert left == pytest.approx(500 - right)


def _jpeg(array: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **save_args)
    return buffer.getvalue()


def _halves(height: int, width: int) -> np.ndarray:
    """Left third red, middle third green, right third blue."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 3, 0] = 255
    array[:, width // 3 : 2 * width // 3, 1] = 255
    array[:, 2 * width // 3 :, 2] = 255
    return array


def test_load_bucketed_resizes_and_centre_crops_into_the_bucket():
    buckets = make_buckets(BucketConfig(resolution=256, multiple=32))
    image, placement = load_bucketed(_jpeg(_halves(500, 1800)), buckets)
    assert placement.bucket == (128, 512) and image.size == (512, 128)
    assert placement.original_size == (500, 1800)
    # 3.6:1 into 4:1: the full width is kept and the height cut to 1800 / 4 = 450, centred.
    assert placement.crop_box == (0.0, 25.0, 1800.0, 475.0)
    tensor = to_vae_input(image)
    assert tensor.shape == (3, 128, 512) and -1.0 <= tensor.min() and tensor.max() <= 1.0


def test_centre_crop_keeps_the_centre_of_a_square_bucket():
    buckets = [(256, 256)]
    image, placement = load_bucketed(_jpeg(_halves(512, 1536)), buckets)
    assert placement.crop_box == (512.0, 0.0, 1024.0, 512.0)
    pixels = np.asarray(image).astype(int)  # the middle third only: green
    assert pixels[:, 8:-8, 1].mean() > 240 and pixels[:, 8:-8, [0, 2]].mean() < 15


def test_draft_decode_matches_a_full_decode_and_resize():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (24, 32, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    data = _jpeg(smooth)  # 2400 x 3200: draft decodes it at 1/8 scale
    buckets = make_buckets(BucketConfig(resolution=256, multiple=32))
    image, placement = load_bucketed(data, buckets)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = full.resize((image.size), Image.Resampling.BICUBIC, box=placement.crop_box)
    error = np.abs(np.asarray(image, float) - np.asarray(reference, float)).mean()
    assert error < 6.0, error  # same content up to resampling differences


def test_exif_orientation_is_applied_before_bucketing():
    array = _halves(300, 900)  # stored wide; orientation 6 displays it rotated: tall
    exif = Image.Exif()
    exif[0x0112] = 6
    buckets = make_buckets(BucketConfig(resolution=256, multiple=32))
    image, placement = load_bucketed(_jpeg(array, exif=exif.tobytes()), buckets)
    assert placement.original_size == (900, 300)
    assert placement.bucket[0] > placement.bucket[1] and image.size[1] > image.size[0]
    assert placement.crop_box[2] - placement.crop_box[0] == pytest.approx(300)
    pixels = np.asarray(image).astype(int)  # rotated 90 degrees clockwise: red is now on top
    assert pixels[:8, :, 0].mean() > 240 and pixels[-8:, :, 2].mean() > 240


def test_png_and_palette_images_decode_to_rgb():
    buffer = io.BytesIO()
    Image.fromarray(_halves(200, 200)).convert("P").save(buffer, format="PNG")
    image, placement = load_bucketed(buffer.getvalue(), [(256, 256)])
    assert image.mode == "RGB" and image.size == (256, 256)
    assert placement.crop_box == (0.0, 0.0, 200.0, 200.0)
