"""The storage layer on local disk, file:// URLs and a real S3-API server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from s3_server import free_port

from pipeline.core import storage
from pipeline.core.storage import MissingPath, StorageError


def _parts(folder: Path) -> list[Path]:
    (folder / "sub").mkdir(parents=True)
    files = [folder / "b.parquet", folder / "a.parquet", folder / "sub" / "c.parquet"]
    for f in files:
        f.write_bytes(f.name.encode())
    (folder / "_SUCCESS").write_bytes(b"")  # Spark side file: not a part
    (folder / ".a.parquet.crc").write_bytes(b"")
    return files


def test_paths_and_schemes():
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert storage.scheme("C:/x") == "" and storage.scheme("S3://b") == "s3"
    assert storage.join("s3://b/run/", "download", "00000.tar") == "s3://b/run/download/00000.tar"
    assert storage.join("/r", "a", "b") == os.path.join("/r", "a", "b")


def test_list_files_takes_a_file_a_glob_a_folder_or_a_list(tmp_path):
    b, a, c = (str(p) for p in _parts(tmp_path / "parts"))
    assert storage.list_files(tmp_path / "parts") == [a, b, c]
    assert storage.list_files(str(tmp_path / "parts" / "*.parquet")) == [a, b]
    assert storage.list_files(b) == [b]
    assert storage.list_files([b, str(tmp_path / "parts" / "sub"), a, b]) == [a, b, c]
    assert storage.list_files("file://" + b) == ["file://" + b]


@pytest.mark.parametrize("spec, says", [
    ("missing.parquet", "no such file"),
    ("empty", "holds no file"),
    ("*.nothing", "matches no file"),
])
def test_list_files_names_what_it_could_not_find(tmp_path, spec, says):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPath, match=says) as e:
        storage.list_files(str(tmp_path / spec))
    assert str(tmp_path / spec) in str(e.value)


def test_local_atomic_writes_leave_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "x.bin"
    storage.write_bytes_atomic(target, b"one")
    storage.write_bytes_atomic(str(target), b"two")
    assert storage.read_bytes(target) == b"two" and storage.size(target) == 3
    with pytest.raises(RuntimeError), storage.staged(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]
    with storage.local_copy(target) as local:
        assert local == target
    with pytest.raises(MissingPath, match="nothing.bin"):
        storage.read_bytes(tmp_path / "nothing.bin")


def test_a_missing_driver_says_which_extra_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on an install without [gcs]
    loaded = sys.modules["fsspec.registry"]._registry  # fsspec.registry is its read-only view
    for name in ("gs", "gcs"):  # forget a driver already loaded by another test
        monkeypatch.delitem(loaded, name, raising=False)
    with pytest.raises(StorageError, match=r"gs:// needs gcsfs: pip install 'rectiflow\[gcs\]'"):
        storage.exists("gs://bucket/run")


def test_s3_round_trip(s3_bucket, tmp_path):
    run = storage.join(s3_bucket, "run")
    storage.write_bytes_atomic(storage.join(run, "b.parquet"), b"bb")
    storage.write_bytes_atomic(storage.join(run, "sub", "a.parquet"), b"a")
    storage.write_bytes_atomic(storage.join(run, "_SUCCESS"), b"")
    with storage.staged(storage.join(run, "c.tar")) as tmp:
        tmp.write_bytes(b"ccc")
    assert not tmp.exists() and not tmp.parent.exists()  # the local temporary is gone

    b, c, a = (storage.join(run, n) for n in ("b.parquet", "c.tar", "sub/a.parquet"))
    assert storage.list_files(run) == [b, c, a]
    assert storage.list_files(storage.join(run, "*.parquet")) == [b]
    assert storage.list_files([a, storage.join(run, "*.tar")]) == [c, a]
    assert storage.exists(c) and not storage.exists(storage.join(run, "d.tar"))
    assert storage.size(c) == 3 and storage.read_bytes(b) == b"bb"
    with storage.open_file(a) as f:
        assert f.read() == b"a"
    with storage.local_copy(c) as local:
        assert local.read_bytes() == b"ccc"
    assert not local.exists()

    local = tmp_path / "shard.tar"
    local.write_bytes(b"shard")
    storage.publish(local, storage.join(run, "shard.tar"))
    assert not local.exists() and storage.read_bytes(storage.join(run, "shard.tar")) == b"shard"
    storage.remove(storage.join(run, "shard.tar"))
    assert not storage.exists(storage.join(run, "shard.tar"))


def test_s3_a_failed_writer_publishes_nothing(s3_bucket):
    final = storage.join(s3_bucket, "x.tar")
    with pytest.raises(RuntimeError), storage.staged(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert not tmp.exists() and not storage.exists(final)


def test_s3_missing_key_and_bucket_name_the_path(s3_bucket):
    for path in (storage.join(s3_bucket, "nothing.parquet"), "s3://no-such-bucket-here/x"):
        with pytest.raises(MissingPath) as e:
            storage.read_bytes(path)
        assert path in str(e.value)
    with pytest.raises(MissingPath, match="no-such-bucket-here"):
        storage.list_files("s3://no-such-bucket-here/parts/")


def test_s3_a_wrong_endpoint_is_a_clear_error(s3_bucket, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    path = storage.join(s3_bucket, "x.parquet")
    with pytest.raises(StorageError) as e:
        storage.read_bytes(path)
    assert path in str(e.value) and closed in str(e.value)
