"""`rectiflow ingest` on real formats made here: img2dataset-layout tars, folders, HF datasets."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from download_factory import encode
from PIL import Image

from pipeline.cli import main as rectiflow
from pipeline.core.manifest import read_manifests

pytestmark = pytest.mark.timeout(60)


def photo(name: str, size=(96, 80)) -> Image.Image:
    """A noise image, different per name (real JPEG/PNG bytes, no asset files)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def jpeg(name: str, size=(96, 80)) -> bytes:
    return encode(photo(name, size))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def img2dataset_tar(path: Path, start: int, n: int) -> Path:
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json (key, url, caption, status, ...)."""
    members = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        meta = {"key": key, "url": f"http://x/{key}.jpg", "caption": f"json caption {i}",
                "status": "success", "width": 96, "height": 80}
        members += [(f"{key}.jpg", jpeg(key)), (f"{key}.txt", f"caption {i}".encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    return write_tar(path, members)


def table(run: Path, shard: str = "00000") -> list[dict]:
    return pq.read_table(run / "download" / f"{shard}.parquet").to_pylist()


def tar_names(run: Path, shard: str = "00000") -> list[str]:
    with tarfile.open(run / "download" / f"{shard}.tar") as tar:
        return tar.getnames()


def test_webdataset_brace_pattern_shards_and_resumes(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        img2dataset_tar(src / f"{k:05d}.tar", k * 10_000, 3)
    (src / "00000_stats.json").write_text("{}")  # img2dataset's side files are not matched
    run = tmp_path / "run"
    argv = ["ingest", str(run), "--webdataset", f"{src}/{{00000..00002}}.tar",
            "--ingest.rows_per_shard=4", "--ingest.decode.min_size=16"]
    assert rectiflow(argv) == 0
    manifests = read_manifests(run / "download")
    assert [m.shard for m in manifests] == ["00000", "00001", "00002"]
    assert [m.rows_in for m in manifests] == [4, 4, 1]
    assert all(m.stage == "download" and m.rows_out == m.rows_in for m in manifests)
    rows = table(run)
    assert [r["uid"] for r in rows] == ["000000000", "000000001", "000000002", "000010000"]
    assert rows[0]["caption"] == "caption 0"  # .txt wins over the json's caption
    assert rows[0]["download_status"] == "success" and rows[0]["download_format"] == "jpg"
    assert rows[0]["download_width"] == 96 and len(rows[0]["download_sha256"]) == 64
    with tarfile.open(run / "download" / "00000.tar") as tar:
        assert tar.extractfile("000000000.jpg").read() == jpeg("000000000")
        assert json.loads(tar.extractfile("000000000.json").read())["caption"] == "caption 0"
    before = (run / "download" / "00001.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert rectiflow(argv) == 0  # rerun: every shard done, nothing rewritten
    assert "0 shard(s) written, 3 already done" in capsys.readouterr().out
    assert (run / "download" / "00001.parquet").stat().st_mtime_ns == before


def test_rerun_redoes_only_shards_whose_samples_changed(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a", "b", "c", "d"):
        (root / f"{name}.jpg").write_bytes(jpeg(name))
    run = tmp_path / "run"
    argv = ["ingest", str(run), "--folder", str(root), "--ingest.rows_per_shard=2",
            "--ingest.decode.min_size=16"]
    assert rectiflow(argv) == 0
    (root / "d.txt").write_text("a new caption for d")  # changes shard 00001 only
    capsys.readouterr()
    assert rectiflow(argv) == 0
    assert "1 shard(s) written, 1 already done" in capsys.readouterr().out
    assert table(run, "00001")[1]["caption"] == "a new caption for d"


def test_caption_field_from_json(tmp_path):
    img2dataset_tar(tmp_path / "a.tar", 0, 2)
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--webdataset", str(tmp_path / "a.tar"),
                      "--ingest.caption_field=caption", "--ingest.decode.min_size=16"]) == 0
    assert [r["caption"] for r in table(run)] == ["json caption 0", "json caption 1"]


def test_bad_tar_members_get_reasons_and_paths_are_only_keys(tmp_path):
    members = [("../evil.jpg", jpeg("evil")), ("../evil.txt", b"escape"),
               ("broken.jpg", jpeg("broken")[:200]), ("broken.txt", b"cut"),
               ("text.jpg", b"<html>not an image</html>"),
               ("big.jpg", b"x" * 60000), ("meta.json", b'{"uid": "u1"}'),
               ("ok.jpg", jpeg("ok")), ("ok.json", b'{"uid": "given-1", "caption": "c"}')]
    tar = write_tar(tmp_path / "bad.tar", members)
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--webdataset", str(tar), "--ingest.max_bytes=50000",
                      "--ingest.decode.min_size=16"]) == 0
    assert not (tmp_path / "evil.jpg").exists()
    rows = {r["url"].split("#")[1]: r for r in table(run)}
    assert rows["bad.tar:../evil"]["download_status"] == "success"
    assert rows["bad.tar:../evil"]["uid"].startswith("id_")  # hashed, no slash or dot
    assert rows["bad.tar:broken"]["download_reason"] == "decode_error"
    assert rows["bad.tar:text"]["download_reason"] == "not_an_image"
    assert rows["bad.tar:big"]["download_reason"] == "too_large"
    assert rows["bad.tar:meta"]["download_reason"] == "no_image"
    assert rows["bad.tar:ok"]["uid"] == "given-1"
    assert sorted(tar_names(run)) == sorted(
        [f"{rows['bad.tar:../evil']['uid']}.jpg", f"{rows['bad.tar:../evil']['uid']}.json",
         "given-1.jpg", "given-1.json"] + [n for n in tar_names(run) if n.endswith("resized.jpg")])


def test_truncated_tar_is_a_reason(tmp_path):
    tar = img2dataset_tar(tmp_path / "t.tar", 0, 2)
    tar.write_bytes(tar.read_bytes()[:2000])  # inside the first image
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--webdataset", str(tar)]) == 0
    assert [r["download_reason"] for r in table(run)] == ["truncated_tar"]


def test_missing_tar_pattern_is_a_clear_error(tmp_path, capsys):
    assert rectiflow(["ingest", str(tmp_path / "run"), "--webdataset",
                      str(tmp_path / "{0..2}.tar")]) == 2
    assert "0.tar does not exist" in capsys.readouterr().err


def test_folder_with_sidecars_and_symlinks(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg("a"))
    (root / "a.txt").write_text("a txt caption\n")
    (root / "sub" / "b.png").write_bytes(encode(photo("b", (80, 80)), "PNG"))
    (root / "sub" / "b.caption").write_text("b caption")
    (root / "c.jpg").write_bytes(jpeg("c"))
    (root / "c.json").write_text(json.dumps({"caption": "c json"}))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg("out"))
    os.symlink(outside, root / "link.jpg")
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--folder", str(root),
                      "--ingest.decode.min_size=16"]) == 0
    rows = {r["ingest_source"]: r for r in table(run)}
    assert {k: r["caption"] for k, r in rows.items() if r["download_status"] == "success"} == {
        "a.jpg": "a txt caption", "c.jpg": "c json", "sub/b.png": "b caption"}
    assert rows["link.jpg"]["download_reason"] == "unsafe_path"
    assert rows["sub/b.png"]["download_format"] == "png"


def test_class_folders(tmp_path):
    root = tmp_path / "imagenet"
    for label in ("golden_retriever", "tabby"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{i}.jpg").write_bytes(jpeg(f"{label}{i}"))
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--folder", str(root), "--ingest.class_folders=true",
                      "--ingest.decode.min_size=16"]) == 0
    captions = [r["caption"] for r in table(run)]
    assert captions == ["a photo of a golden retriever"] * 2 + ["a photo of a tabby"] * 2


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rectiflow(["ingest", str(tmp_path / "run"), "--folder", str(tmp_path / "empty")]) == 2
    assert "holds no image" in capsys.readouterr().err


def saved_hf_dataset(path: Path, with_image: bool = True) -> Path:
    import datasets

    data = {"text": ["one", "two", "three"], "id": ["r0", "r1", "r2"]}
    features = {"text": datasets.Value("string"), "id": datasets.Value("string")}
    if with_image:
        data["image"] = [photo(f"hf{i}", (72, 64)) for i in range(3)]
        features["image"] = datasets.Image()
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).save_to_disk(path)
    return path


def test_hf_save_to_disk(tmp_path):
    saved = saved_hf_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--hf", str(saved), "--ingest.rows_per_shard=2",
                      "--ingest.decode.min_size=16"]) == 0
    rows = table(run) + table(run, "00001")
    assert [(r["uid"], r["caption"], r["download_status"]) for r in rows] == [
        ("r0", "one", "success"), ("r1", "two", "success"), ("r2", "three", "success")]
    assert rows[0]["download_width"] == 72


def test_hf_without_image_column_lists_columns(tmp_path, capsys):
    saved = saved_hf_dataset(tmp_path / "ds", with_image=False)
    assert rectiflow(["ingest", str(tmp_path / "run"), "--hf", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "no image column 'image'" in err and "'text'" in err and "'id'" in err


def test_hf_hub_id_offline_says_how_to_point_at_a_local_copy(tmp_path, capsys):
    assert rectiflow(["ingest", str(tmp_path / "run"), "--hf", "someone/not-here"]) == 2
    assert "point --hf at a local copy" in capsys.readouterr().err


def test_hf_parquet_is_streamed(tmp_path):
    import datasets

    saved = saved_hf_dataset(tmp_path / "ds")
    datasets.load_from_disk(str(saved)).to_parquet(str(tmp_path / "train.parquet"))
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--hf", str(tmp_path / "train.parquet"),
                      "--ingest.decode.min_size=16"]) == 0
    assert [(r["uid"], r["download_status"]) for r in table(run)] == [
        ("r0", "success"), ("r1", "success"), ("r2", "success")]


def test_refuses_a_run_that_holds_a_url_download(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "download" / "_inputs").mkdir(parents=True)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.jpg").write_bytes(jpeg("a"))
    assert rectiflow(["ingest", str(run), "--folder", str(tmp_path / "p")]) == 2
    assert "already holds a URL-list download" in capsys.readouterr().err


def test_webdataset_from_object_storage(tmp_path, s3_bucket):
    from pipeline.core.storage import write_bytes_atomic

    local = img2dataset_tar(tmp_path / "00000.tar", 0, 2)
    write_bytes_atomic(f"{s3_bucket}/wds/00000.tar", local.read_bytes())
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--webdataset", f"{s3_bucket}/wds/{{00000..00000}}.tar",
                      "--ingest.decode.min_size=16"]) == 0
    assert [r["uid"] for r in table(run)] == ["000000000", "000000001"]
