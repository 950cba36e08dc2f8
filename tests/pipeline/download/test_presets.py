"""List presets (LAION, LAION-5B, DataComp, COYO, CC12M) through the URL cutting, missing
columns as errors naming column and part, face blurring, and the curate configs loading."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.command import InputError
from pipeline.core.config import load_config
from pipeline.core.decode import DecodeConfig
from pipeline.core.runners import RunnerConfig
from pipeline.download.cli import COMMAND as DOWNLOAD
from pipeline.download.faces import blur_faces, pixel_boxes
from pipeline.download.fetch import FetchConfig
from pipeline.download.inputs import cut_input_shards
from pipeline.download.local_server import LocalImageServer
from pipeline.download.stage import DownloadConfig, run_download

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]


def cut(urls, stage: Path, **settings) -> list[dict]:
    config = DownloadConfig(**{"rows_per_shard": 2, "processes_count": 0, **settings})
    shards = cut_input_shards(str(urls), stage, config)
    return [row for _, path in shards for row in pq.read_table(path).to_pylist()]


def laion_table(n=3, aesthetic=True) -> pa.Table:
    data = {"URL": [f"http://x.invalid/{i}.jpg" for i in range(n)],
            "TEXT": [f"laion caption {i}" for i in range(n)],
            "WIDTH": [640.0] * n, "HEIGHT": [480.0] * n, "similarity": [0.31] * n,
            "hash": [123] * n, "punsafe": [0.01] * n, "pwatermark": [0.2] * n}
    if aesthetic:
        data["AESTHETIC_SCORE"] = [5.5] * n
    return pa.table(data)


def test_laion_preset_maps_url_text_and_keeps_its_score_columns(tmp_path):
    pq.write_table(laion_table(), tmp_path / "part-0.parquet")
    rows = cut(tmp_path / "part-0.parquet", tmp_path / "d", preset="laion")
    assert [r["caption"] for r in rows] == [f"laion caption {i}" for i in range(3)]
    assert rows[0]["url"] == "http://x.invalid/0.jpg" and rows[0]["uid"].startswith("h_")
    assert set(rows[0]) == {"uid", "url", "caption", "similarity", "punsafe", "pwatermark",
                            "AESTHETIC_SCORE", "WIDTH", "HEIGHT", "download_reason_in"}
    assert rows[0]["AESTHETIC_SCORE"] == 5.5  # typed as in the list, for select's rules
    # a release without AESTHETIC_SCORE (LAION-2B-en) still cuts: preset columns when present
    pq.write_table(laion_table(aesthetic=False), tmp_path / "en.parquet")
    assert "AESTHETIC_SCORE" not in cut(tmp_path / "en.parquet", tmp_path / "e", preset="laion")[0]


def test_laion5b_uses_sample_id_and_an_explicit_setting_beats_the_preset(tmp_path):
    table = laion_table().append_column("SAMPLE_ID", pa.array([7, 8, 9], pa.int64()))
    pq.write_table(table, tmp_path / "p.parquet")
    rows = cut(tmp_path / "p.parquet", tmp_path / "d", preset="laion5b")
    assert [r["uid"] for r in rows] == ["7", "8", "9"]
    rows = cut(tmp_path / "p.parquet", tmp_path / "o", preset="laion5b", caption_column="URL",
               passthrough_columns=["hash"])
    assert rows[0]["caption"] == "http://x.invalid/0.jpg"
    assert set(rows[0]) == {"uid", "url", "caption", "hash", "download_reason_in"}


def datacomp_table(urls: list[str], boxes=None) -> pa.Table:
    n = len(urls)
    return pa.table({
        "uid": [f"{i:032x}" for i in range(10, 10 + n)], "url": urls,
        "text": [f"datacomp caption {i}" for i in range(n)],
        "original_width": [64] * n, "original_height": [48] * n,
        "clip_b32_similarity_score": [0.3] * n, "clip_l14_similarity_score": [0.25] * n,
        "face_bboxes": pa.array(boxes or [[] for _ in urls], pa.list_(pa.list_(pa.float64()))),
        "sha256": ["0" * 64] * n})


def test_datacomp_uid_becomes_the_uid_and_text_the_caption(tmp_path):
    pq.write_table(datacomp_table(["http://x.invalid/a", "http://x.invalid/b"]),
                   tmp_path / "dc.parquet")
    rows = cut(tmp_path / "dc.parquet", tmp_path / "d", preset="datacomp")
    assert [r["uid"] for r in rows] == [f"{10:032x}", f"{11:032x}"]
    assert [r["caption"] for r in rows] == ["datacomp caption 0", "datacomp caption 1"]
    assert rows[0]["clip_l14_similarity_score"] == 0.25 and rows[0]["face_bboxes"] == []
    # without the preset the list's own uid would be replaced: an error, not a silent drop
    with pytest.raises(InputError, match=r"dc.parquet has a column 'uid'.*download.id_column=uid"):
        cut(tmp_path / "dc.parquet", tmp_path / "n", caption_column="text")


def test_coyo_preset(tmp_path):
    n = 3
    table = pa.table({
        "id": pa.array([101, 102, 103], pa.int64()),
        "url": [f"http://x.invalid/{i}.png" for i in range(n)],
        "text": ["coyo a", "coyo b", "coyo c"], "width": [640] * n, "height": [480] * n,
        "image_phash": ["ff00"] * n, "text_length": [6] * n, "word_count": [2] * n,
        "num_tokens_bert": [3] * n, "num_tokens_gpt": [3] * n, "num_faces": [0] * n,
        "clip_similarity_vitb32": [0.3] * n, "clip_similarity_vitl14": [0.28] * n,
        "nsfw_score_opennsfw2": [0.01] * n, "nsfw_score_gantman": [0.02] * n,
        "watermark_score": [0.1, 0.6, 0.2], "aesthetic_score_laion_v2": [5.1, 4.2, 6.3]})
    pq.write_table(table, tmp_path / "coyo.parquet")
    rows = cut(tmp_path / "coyo.parquet", tmp_path / "d", preset="coyo")
    assert [(r["uid"], r["caption"]) for r in rows] == [("101", "coyo a"), ("102", "coyo b"),
                                                        ("103", "coyo c")]
    assert [r["watermark_score"] for r in rows] == [0.1, 0.6, 0.2]
    assert "num_faces" not in rows[0]  # not a preset column


def test_cc12m_headerless_tsv(tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text('http://x.invalid/1.jpg\ta "quoted" <PERSON> caption, with commas\n'
                   "http://x.invalid/2.jpg\tsecond one\n"
                   "http://x.invalid/3.jpg\tthird\n")
    rows = cut(tsv, tmp_path / "d", preset="cc12m")
    assert [r["url"] for r in rows] == [f"http://x.invalid/{i}.jpg" for i in (1, 2, 3)]
    assert rows[0]["caption"] == 'a "quoted" <PERSON> caption, with commas'
    assert set(rows[0]) == {"uid", "url", "caption", "download_reason_in"}
    # a line with another number of fields than the preset's names
    (tmp_path / "bad.tsv").write_text("http://x.invalid/1.jpg\tone\textra\n")
    with pytest.raises(InputError, match=r"bad.tsv:1 has 3 fields.*\['url', 'caption'\]"):
        cut(tmp_path / "bad.tsv", tmp_path / "b", preset="cc12m")


def test_missing_configured_columns_are_errors_naming_column_and_part(tmp_path):
    pq.write_table(laion_table(), tmp_path / "part-0.parquet")
    urls = tmp_path / "part-0.parquet"
    # the case: url_column=URL alone used to make every caption null
    with pytest.raises(InputError, match=r"part-0.parquet has no column 'caption' "
                       r"\(download.caption_column\); its columns: \['AESTHETIC_SCORE', 'HEIGHT'"
                       r".*captions_optional"):
        cut(urls, tmp_path / "a", url_column="URL")
    with pytest.raises(InputError, match=r"no column 'url' \(download.url_column \(preset "
                       r"'datacomp'\)\)"):
        cut(urls, tmp_path / "b", preset="datacomp")
    with pytest.raises(InputError, match=r"no column 'LICENSE' \(download.passthrough_columns"):
        cut(urls, tmp_path / "c", preset="laion", passthrough_columns=["LICENSE"])
    with pytest.raises(InputError, match=r"no column 'face_bboxes' \(download.blur_faces"):
        cut(urls, tmp_path / "f", preset="laion", blur_faces=True)
    assert not (tmp_path / "a" / "_inputs").exists() or not list(
        (tmp_path / "a" / "_inputs").glob("*.parquet"))
    rows = cut(urls, tmp_path / "ok", url_column="URL", captions_optional=True)
    assert {r["caption"] for r in rows} == {None}  # said explicitly: no captions


def test_preset_from_overrides_and_toml(tmp_path):
    sections = load_config(DOWNLOAD.schema, None, ["--download.preset=datacomp",
                                                   "--download.blur_faces=true"])
    config = sections["download"]
    assert (config.url_column, config.caption_column, config.id_column) == ("url", "text", "uid")
    assert config.blur_faces
    toml = tmp_path / "d.toml"
    toml.write_text('[download]\npreset = "cc12m"\ncaption_column = "alt"\n'
                    'column_names = ["url", "alt"]\n')
    config = load_config(DOWNLOAD.schema, toml)["download"]
    assert (config.input_format, config.caption_column, config.column_names) == (
        "tsv", "alt", ["url", "alt"])


def test_every_curate_config_loads():
    from ray_jobs.curate import SCHEMA

    configs = sorted((ROOT / "configs").glob("curate_*.toml"))
    assert {p.name for p in configs} >= {"curate_laion.toml", "curate_datacomp.toml",
                                         "curate_coyo.toml"}
    expected = {"curate_laion.toml": "laion", "curate_datacomp.toml": "datacomp",
                "curate_coyo.toml": "coyo"}
    for path in configs:
        sections = load_config(SCHEMA, path)
        if path.name in expected:
            assert sections["download"].preset == expected[path.name], path


# --- face blurring ------------------------------------------------------------------------


def noise_png(width=64, height=48, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_blur_changes_exactly_the_widened_box_pixels():
    data = noise_png()
    boxes = [[0.25, 0.25, 0.5, 0.5], [0.75, 0.0, 1.0, 0.25]]
    blurred, count = blur_faces(data, boxes, jpeg_quality=95)
    assert count == 2
    before = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
    after = np.asarray(Image.open(io.BytesIO(blurred)), dtype=np.int16)
    inside = np.zeros(before.shape[:2], bool)
    pixels, side = pixel_boxes(boxes, 64, 48)
    assert side == 16 and pixels == [(15, 11, 33, 25), (47, 0, 64, 13)]  # +10% of 16 = 1 px
    for x0, y0, x1, y1 in pixels:
        inside[y0:y1, x0:x1] = True
    changed = (before != after).any(axis=2)
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.9  # noise blurred: nearly every pixel moves
    assert np.abs(after - before)[inside].mean() > 20
    assert blur_faces(data, [], 95) == (data, 0)


def test_datacomp_list_through_a_real_download_with_face_blurring(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "face.png").write_bytes(noise_png(seed=1))
    (site / "plain.png").write_bytes(noise_png(seed=2))
    with LocalImageServer(site) as server:
        urls = [server.url("face.png"), server.url("plain.png"), server.url("missing.png")]
        boxes = [[[0.1, 0.1, 0.4, 0.5]], [], []]
        pq.write_table(datacomp_table(urls, boxes), tmp_path / "dc.parquet")
        config = DownloadConfig(
            preset="datacomp", blur_faces=True, rows_per_shard=8, thread_count=2,
            processes_count=0, fetch=FetchConfig(allow_loopback=True, timeout_s=5.0),
            decode=DecodeConfig(min_size=32, image_size=32))
        run_download(config, RunnerConfig(backend="local"), str(tmp_path / "dc.parquet"),
                     tmp_path / "run")
    rows = pq.read_table(tmp_path / "run" / "download" / "00000.parquet").to_pylist()
    assert [r["uid"] for r in rows] == [f"{i:032x}" for i in (10, 11, 12)]
    assert [r["caption"] for r in rows] == [f"datacomp caption {i}" for i in range(3)]
    assert [r["download_status"] for r in rows] == ["success", "success", "failed"]
    assert [r["download_faces_blurred"] for r in rows] == [1, 0, None]
    # the list's columns travel into the download table, where select's column rules read them
    assert rows[0]["clip_l14_similarity_score"] == 0.25
    assert rows[0]["face_bboxes"] == [[0.1, 0.1, 0.4, 0.5]]
    with tarfile.open(tmp_path / "run" / "download" / "00000.tar") as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    face, plain = stored[f"{10:032x}.png"], stored[f"{11:032x}.png"]
    assert face != (site / "face.png").read_bytes()  # the blurred image is what is stored
    assert plain == (site / "plain.png").read_bytes()  # no boxes: the server's bytes
    assert rows[0]["download_sha256"] == hashlib.sha256(face).hexdigest()
    assert rows[0]["download_bytes"] == len(face)
    assert rows[1]["download_sha256"] == hashlib.sha256(plain).hexdigest()
