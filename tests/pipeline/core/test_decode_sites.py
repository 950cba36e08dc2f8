"""Every place that turns image bytes into pixels gives the decode module's verdict, and every
reader of download tars finds every format the download stage can store."""

from __future__ import annotations

import io
import tarfile
import warnings

import hostile_images as hostile
import pytest

from captioning.config import CaptionConfig
from captioning.stage import CaptionStage
from dedup.perceptual import signature_or_none
from dedup.run_inputs import tar_signatures
from demo.gather import images_by_uid
from demo.report_assets import AssetWriter
from pipeline.core.decode import ImageRejected
from pipeline.encode.buckets import BucketConfig, load_bucketed, make_buckets
from pipeline.score.stage import TarIndex, _prepare
from train.autoencoder import load_images

pytestmark = pytest.mark.timeout(120)
CAP = 89_478_485  # the stages' default max_pixels
BUCKETS = make_buckets(BucketConfig(resolution=64, multiple=32))


def _reason(decode) -> str | None:
    try:
        decode()
    except ImageRejected as e:
        return e.reason
    return None


def site_verdicts(data: bytes, tmp_path) -> dict[str, str | bool | None]:
    """Reason (or None) from the sites that record one; whether it was usable from the rest."""
    prepared = _prepare(data, 64, CAP, preprocess=lambda image: image)
    caption = CaptionStage(CaptionConfig(image_size=64))._decode(data)
    path = tmp_path / "sample.img.jpg"  # the autoencoder's folder reader takes any image suffix
    path.write_bytes(data)
    try:
        autoencoder_ok = load_images(path, 32).shape == (1, 3, 32, 32)
    except ValueError:  # "no readable images"
        autoencoder_ok = False
    thumbnail = AssetWriter(tmp_path / "report").thumbnail("sample", data, "alt")
    return {
        "score": prepared if isinstance(prepared, str) else None,
        "caption": caption if isinstance(caption, str) else None,
        "encode": _reason(lambda: load_bucketed(data, BUCKETS, CAP)),
        "dedup_usable": signature_or_none(data) is not None,
        "autoencoder_usable": autoencoder_ok,
        "report_usable": "undecodable" not in thumbnail,
    }


@pytest.mark.parametrize("name", sorted(hostile.CASES))
def test_every_decode_site_gives_the_same_verdict(name, tmp_path):
    case = hostile.CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt EXIF it tolerates
        got = site_verdicts(case.data, tmp_path)
    usable = case.reason is None
    assert got == {"score": case.reason, "caption": case.reason, "encode": case.reason,
                   "dedup_usable": usable, "autoencoder_usable": usable, "report_usable": usable}


def test_encode_puts_an_exif_rotated_image_with_a_broken_block_upright():
    image, placement = load_bucketed(hostile.CASES["broken_exif_rotated_jpeg"].data, BUCKETS)
    assert placement.original_size == (72, 96)  # (height, width), upright


def _download_tar(path, cases: dict[str, hostile.Case]):
    with tarfile.open(path, "w") as tar:
        for uid, case in cases.items():
            for name, payload in ((f"{uid}.{case.ext}", case.data), (f"{uid}.json", b"{}"),
                                  (f"{uid}.resized.jpg", hostile.CASES["cmyk_jpeg"].data)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tar_readers_find_every_stored_format(tmp_path):
    """ICO, PPM, TIFF, ... originals were `missing_image` in score when its extension list
    was its own; every reader now takes the decode module's table."""
    stored = {name: c for name, c in hostile.CASES.items() if c.reason is None}
    _download_tar(tmp_path / "00000.tar", stored)
    assert set(TarIndex(tmp_path / "00000.tar").entries) == set(stored)
    assert set(tar_signatures(tmp_path / "00000.tar")) == set(stored)
    assert set(images_by_uid(tmp_path, set(stored))) == set(stored)
    assert load_images(tmp_path / "00000.tar", 16).shape[0] == len(stored)  # originals only
    data = TarIndex(tmp_path / "00000.tar").read_many(["ppm", "ico"])
    assert data == [stored["ppm"].data, stored["ico"].data]
