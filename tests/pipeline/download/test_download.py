"""The download stage end to end: every bad input ends with its reason, shards follow the
contract in docs/formats.md, reruns resume, --retry-failed redoes only the transient."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from download_assets import CASES, case_url
from PIL import Image

from pipeline.core.decode import DecodeConfig
from pipeline.core.manifest import completed_manifest, read_manifests
from pipeline.core.runners import RunnerConfig
from pipeline.download.cli import main as download_main
from pipeline.download.fetch import FetchConfig
from pipeline.download.stage import DownloadConfig, run_download

pytestmark = pytest.mark.timeout(120)
LOCAL = RunnerConfig(backend="local")


def config(**overrides) -> DownloadConfig:
    fields = dict(
        rows_per_shard=8, thread_count=8, processes_count=0,
        fetch=FetchConfig(allow_loopback=True, timeout_s=1.0, socket_timeout_s=1.0),
        decode=DecodeConfig(min_size=32, image_size=64),
    )
    return DownloadConfig(**{**fields, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "download").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_every_case_ends_with_its_reason_and_shards_follow_the_contract(image_server, tmp_path):
    rows = [{"url": case_url(image_server.base_url, c), "caption": f"case {c}", "lang": "en"}
            for c in CASES]
    rows += [dict(rows[0]), {"url": None, "caption": "no url"}]  # a repeat and a hole
    urls = write_jsonl(tmp_path / "urls.jsonl", rows)
    start, started_at = time.perf_counter(), time.time()
    manifests = run_download(config(), LOCAL, urls, tmp_path / "run")
    elapsed = time.perf_counter() - start

    out = read_rows(tmp_path / "run")
    assert [r["url"] for r in out] == [r["url"] for r in rows]  # every row, in input order
    expected = list(CASES.values()) + ["duplicate_uid", "missing_url"]
    assert [r["download_reason"] for r in out] == expected
    # slow servers cost their deadline (1 s), not a hang (a few seconds here when idle; the
    # bound leaves room for a loaded 2-core machine)
    assert elapsed < 30
    for row in out:
        assert row["download_status"] == ("success" if row["download_reason"] is None else "failed")
        assert row["lang"] == ("en" if row["caption"] != "no url" else None)  # passthrough
    assert out[-2]["uid"] == out[0]["uid"]
    assert sum(m.rows_in for m in manifests) == len(rows)
    assert sum(m.rows_out for m in manifests) == sum(r is None for r in expected)

    by_uid = {r["uid"]: r for r in out if r["download_status"] == "success"}
    entries: dict[str, bytes] = {}
    for manifest in manifests:
        entries.update(read_tar(tmp_path / "run" / "download" / f"{manifest.shard}.tar"))
    assert {name.split(".", 1)[0] for name in entries} == set(by_uid)  # successes only
    for uid, row in by_uid.items():
        original = entries[f"{uid}.{row['download_format']}"]
        served = (image_server._server.root / row["url"].rsplit("/", 1)[-1]).read_bytes()
        assert original == served and hashlib.sha256(original).hexdigest() == row["download_sha256"]
        meta = json.loads(entries[f"{uid}.json"])
        assert (meta["uid"], meta["caption"]) == (uid, row["caption"])
        resized = Image.open(io.BytesIO(entries[f"{uid}.resized.jpg"]))
        assert resized.mode == "RGB" and min(resized.size) <= 64
    rotated = next(r for r in out if r["url"].endswith("rotated.jpg"))
    assert (rotated["download_width"], rotated["download_height"]) == (451, 300)
    http_429 = next(r for r in out if r["download_reason"] == "http_429")
    assert http_429["download_retryable"] and http_429["download_http_status"] == 429
    # Retry-After: 7, counted from when the request failed (some time during the run)
    assert started_at + 7 - 1 <= http_429["download_retry_at"] <= time.time() + 7 + 1


def test_rerun_skips_completed_shards(image_server, tmp_path):
    urls = write_jsonl(tmp_path / "urls.jsonl",
                       [{"url": image_server.url(n), "caption": n}
                        for n in ("astronaut.jpg", "missing.jpg")])
    first = run_download(config(rows_per_shard=1), LOCAL, urls, tmp_path / "run")
    hits = image_server.hits["/astronaut.jpg"]
    second = run_download(config(rows_per_shard=1, thread_count=3), LOCAL, urls, tmp_path / "run")
    assert image_server.hits["/astronaut.jpg"] == hits  # nothing fetched again
    assert [m.outputs for m in first] == [m.outputs for m in second]
    # A changed policy invalidates the shards: they are redone.
    stricter = config(rows_per_shard=1, decode=DecodeConfig(min_size=600, image_size=64))
    third = run_download(stricter, LOCAL, urls, tmp_path / "run")
    assert third[0].reasons == {"too_small": 1}


def test_parquet_csv_and_jsonl_lists_give_the_same_uids(image_server, tmp_path):
    rows = [{"id": "a1", "url": image_server.url("astronaut.jpg"), "caption": "x"},
            {"id": "bad.id/1", "url": image_server.url("coffee.jpg"), "caption": "y"},
            {"id": None, "url": image_server.url("chelsea.png"), "caption": None}]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "urls.parquet")
    pacsv.write_csv(table, tmp_path / "urls.csv")
    write_jsonl(tmp_path / "urls.jsonl", rows)
    uids = []
    for name in ("urls.parquet", "urls.csv", "urls.jsonl"):
        run_download(config(), LOCAL, tmp_path / name, tmp_path / name.replace(".", "_"))
        out = read_rows(tmp_path / name.replace(".", "_"))
        assert [r["download_status"] for r in out] == ["success"] * 3
        uids.append([r["uid"] for r in out])
    assert uids[0] == uids[1] == uids[2]
    assert uids[0][0] == "a1" and uids[0][1].startswith("id_") and uids[0][2].startswith("h_")


def test_retry_failed_redoes_only_retryable_rows_after_retry_after(image_server, tmp_path):
    paths = ["flaky/1/503/coffee.jpg?retry_after=1", "missing.jpg", "astronaut.jpg",
             "flaky/5/429/chelsea.png?retry_after=1"]
    urls = write_jsonl(tmp_path / "urls.jsonl", [{"url": image_server.url(p)} for p in paths])
    overrides = ["--download.fetch.allow_loopback=true", "--download.processes_count=0",
                 "--download.captions_optional=true",
                 "--download.rows_per_shard=2"]
    out = tmp_path / "run"
    assert download_main(["--urls", str(urls), "--out", str(out), *overrides]) == 0
    first = read_rows(out)
    failed_at = time.time()
    assert [r["download_reason"] for r in first] == ["http_503", "http_404", None, "http_429"]
    tar_before = read_tar(out / "download" / "00001.tar")
    hits = dict(image_server.hits)

    assert download_main(["--out", str(out), "--retry-failed", *overrides]) == 0
    second = read_rows(out)
    assert time.time() - failed_at >= 0.9  # waited for Retry-After: 1
    assert [r["download_reason"] for r in second] == [None, "http_404", None, "http_429"]
    assert [r["download_attempts"] for r in second] == [2, 1, 1, 2]
    assert image_server.hits["/missing.jpg"] == hits["/missing.jpg"]  # not retryable
    assert image_server.hits["/astronaut.jpg"] == hits["/astronaut.jpg"]  # kept, not refetched
    assert read_tar(out / "download" / "00001.tar") == tar_before  # bytes carried over
    assert second[2] == first[2]
    stage = out / "download"
    manifests = read_manifests(stage)
    assert [m.rows_out for m in manifests] == [1, 1]
    fingerprint = manifests[0].config_hash
    for m in manifests:  # rewritten shards are complete and current
        assert completed_manifest(stage, m.shard, fingerprint, [stage / "_inputs" / f"{m.shard}.parquet"])


def test_cli_rejects_unknown_config_keys(tmp_path, capsys):
    assert download_main(["--urls", "x.jsonl", "--out", str(tmp_path), "--download.nope=1"]) == 2
    assert "download.nope" in capsys.readouterr().err
