"""Writes download-stage shards in the documented format (docs/formats.md) for the tests.

Images are real photos shipped with scikit-image, encoded as JPEG or PNG at a few sizes, so
the score stage decodes real files; failed rows carry download reasons and have no tar entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data as skdata

from pipeline.core.manifest import ShardManifest, shard_outputs

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "page")
CAPTIONS = (
    "an astronaut in a white suit in front of a flag",
    "a cup of coffee on a saucer",
    "a ginger cat looking at the camera",
    "a rocket standing on the launch pad",
    "a man with a camera on a tripod",
    "old coins",
    "horse",
    "a printed page of text",
)


@dataclass
class FactoryRow:
    uid: str
    caption: str
    status: str  # success | failed
    reason: str | None = None
    image: bytes | None = None
    ext: str = "jpg"
    width: int | None = None
    height: int | None = None


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    array = getattr(skdata, name)()
    if array.dtype != np.uint8:
        array = (array.astype(np.float64) / array.max() * 255).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB")
    return image.resize(size) if size else image


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def success_row(uid: str, caption: str, image: Image.Image, fmt: str = "JPEG") -> FactoryRow:
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    return FactoryRow(uid, caption, "success", None, encode(image, fmt), ext, *image.size)


def demo_rows(shard: int, rows: int, failures_every: int = 4) -> list[FactoryRow]:
    """`rows` rows: photos at varied sizes and formats, every n-th row a failed download."""
    out = []
    for i in range(rows):
        index = shard * rows + i
        uid = f"s{shard:03d}r{i:04d}"
        name, caption = PHOTOS[index % len(PHOTOS)], CAPTIONS[index % len(CAPTIONS)]
        if failures_every and i % failures_every == failures_every - 1:
            out.append(FactoryRow(uid, caption, "failed", "http_404"))
            continue
        size = (96 + 16 * (index % 5), 64 + 24 * (index % 3))
        out.append(success_row(uid, caption, photo(name, size), "PNG" if i % 3 == 0 else "JPEG"))
    return out


def write_download_shard(download_dir: Path, shard: str, rows: list[FactoryRow]) -> ShardManifest:
    """Write <shard>.tar (successes), <shard>.parquet (every row) and the shard manifest."""
    manifest = ShardManifest(stage="download", shard=shard, config_hash="factory")
    with shard_outputs(Path(download_dir), manifest, []) as outputs:
        with tarfile.open(outputs.path(f"{shard}.tar"), "w") as tar:
            for row in rows:
                if row.status == "success":
                    _add(tar, f"{row.uid}.{row.ext}", row.image)
                    _add(tar, f"{row.uid}.json", json.dumps({"uid": row.uid}).encode())
        pq.write_table(_table(rows), outputs.path(f"{shard}.parquet"))
        manifest.rows_in = len(rows)
        manifest.reasons = {}
        for row in rows:
            if row.reason:
                manifest.reasons[row.reason] = manifest.reasons.get(row.reason, 0) + 1
        manifest.rows_out = len(rows) - sum(manifest.reasons.values())
    return manifest


def write_download_run(
    run_dir: Path, shards: int = 2, rows: int = 8, failures_every: int = 4
) -> Path:
    download_dir = Path(run_dir) / "download"
    for s in range(shards):
        write_download_shard(download_dir, f"{s:05d}", demo_rows(s, rows, failures_every))
    return download_dir


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _table(rows: list[FactoryRow]) -> pa.Table:
    ok = [r.status == "success" for r in rows]
    return pa.table(
        {
            "uid": [r.uid for r in rows],
            "url": [f"http://127.0.0.1/{r.uid}.{r.ext}" for r in rows],
            "caption": [r.caption for r in rows],
            "download_status": [r.status for r in rows],
            "download_reason": pa.array([r.reason for r in rows], pa.string()),
            "download_retryable": [False for _ in rows],
            "download_http_status": [200 if k else 404 for k in ok],
            "download_width": pa.array([r.width for r in rows], pa.int32()),
            "download_height": pa.array([r.height for r in rows], pa.int32()),
            "download_format": pa.array([r.ext if k else None for r, k in zip(rows, ok, strict=True)]),
            "download_bytes": pa.array([len(r.image) if r.image else None for r in rows], pa.int64()),
            "download_sha256": pa.array(
                [hashlib.sha256(r.image).hexdigest() if r.image else None for r in rows]
            ),
        }
    )


def tiny_clip_dir(request, tmp_path_factory) -> Path:
    """The tiny open_clip model: the shared `tiny_models` fixture when there is one."""
    import pytest

    try:
        return Path(request.getfixturevalue("tiny_models")) / "open_clip"
    except pytest.FixtureLookupError:
        from model.tiny import write_tiny_open_clip

        return write_tiny_open_clip(tmp_path_factory.mktemp("tiny") / "open_clip", seed=0)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, followed by a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """JPEG bytes whose EXIF says to rotate (6: 90 degrees clockwise, width and height swap)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()
