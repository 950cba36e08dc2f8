"""URL lists in parts: shard ids, the uid index, duplicates across parts, bad parts, S3."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import storage
from pipeline.core.command import InputError
from pipeline.core.uids import UID_INDEX_BUCKETS, UID_INDEX_DIR, uid_bucket
from pipeline.download.cli import main as download_main
from pipeline.download.inputs import cut_input_shards
from pipeline.download.stage import DownloadConfig

pytestmark = pytest.mark.timeout(60)


def write_parts(folder: Path, sizes=(5, 3, 4)) -> list[Path]:
    """Parquet parts; part 2 repeats part 0's third row (same id) and has its own rows."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, n in enumerate(sizes):
        rows = [{"id": f"p{p}r{r}", "url": f"http://x.invalid/{p}/{r}.jpg", "caption": f"c{r}"}
                for r in range(n)]
        if p == 2:
            rows[1] = {"id": "p0r2", "url": "http://x.invalid/again.jpg", "caption": "again"}
        paths.append(folder / f"part-{p:03d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[-1])
    (folder / "_SUCCESS").write_text("")
    return paths


def cut(urls, stage: Path, **overrides):
    config = DownloadConfig(**{"rows_per_shard": 2, "processes_count": 0, **overrides})
    return cut_input_shards(urls, stage, config)


def rows_of(shards) -> list[dict]:
    return [dict(row, shard=s) for s, path in shards for row in pq.read_table(path).to_pylist()]


def test_parts_are_cut_per_part_with_stable_ids_and_a_uid_index(tmp_path):
    write_parts(tmp_path / "urls")
    shards = cut(tmp_path / "urls", tmp_path / "download")
    # 5 rows -> 3 shards, 3 -> 2, 4 -> 2: per part, numbered across parts
    assert [s for s, _ in shards] == [f"{k:05d}" for k in range(7)]
    rows = rows_of(shards)
    assert [r["uid"] for r in rows][:5] == [f"p0r{r}" for r in range(5)]
    repeat = [r for r in rows if r["uid"] == "p0r2"]
    assert [(r["shard"], r["download_reason_in"]) for r in repeat] == [
        ("00001", None), ("00005", "duplicate_uid")]  # first in (part, row) order wins
    assert sum(r["download_reason_in"] is not None for r in rows) == 1

    index = tmp_path / "download" / UID_INDEX_DIR
    assert len(list(index.glob("*.parquet"))) == UID_INDEX_BUCKETS
    for row in rows:
        bucket = pq.read_table(index / f"{uid_bucket(row['uid']):02x}.parquet").to_pylist()
        assert {"uid": row["uid"], "shard": "00001" if row["uid"] == "p0r2" else row["shard"]} in bucket
    assert sum(pq.read_metadata(p).num_rows for p in index.glob("*.parquet")) == len(rows) - 1

    # a process pool cuts the same shards; a rerun of the same list does not cut again
    again = cut(str(tmp_path / "urls" / "part-*.parquet"), tmp_path / "pool", processes_count=2)
    assert [p.read_bytes() for _, p in again] == [p.read_bytes() for _, p in shards]
    stamps = [p.stat().st_mtime_ns for _, p in shards]
    assert cut(tmp_path / "urls", tmp_path / "download") == shards
    assert [p.stat().st_mtime_ns for _, p in shards] == stamps
    assert not list((tmp_path / "download").rglob(".cut*"))


def test_one_file_list_is_cut_as_before(tmp_path):
    rows = [{"url": f"http://x.invalid/{i}.jpg"} for i in range(5)] + [{"url": None}]
    rows.append(dict(rows[0]))
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = cut(urls, tmp_path / "download", rows_per_shard=3, captions_optional=True)
    assert [s for s, _ in shards] == ["00000", "00001", "00002"]
    reasons = [r["download_reason_in"] for r in rows_of(shards)]
    assert reasons == [None] * 5 + ["missing_url", "duplicate_uid"]


@pytest.mark.parametrize("bad, says", [
    (pa.table({"id": ["z"], "url": ["http://x.invalid/z"], "caption": ["z"], "extra": [1]}),
     "extra: extra"),
    (pa.table({"id": ["z"], "url": [1], "caption": ["z"]}), "url string -> int64"),
    (pa.table({"id": ["z"], "link": ["http://x.invalid/z"], "caption": ["z"]}),
     "has no column 'url'"),
])
def test_a_part_with_other_columns_is_named_before_anything_is_written(tmp_path, bad, says):
    write_parts(tmp_path / "urls")
    pq.write_table(bad, tmp_path / "urls" / "part-001.parquet")
    with pytest.raises(InputError, match=says) as e:
        cut(tmp_path / "urls", tmp_path / "download")
    assert "part-001.parquet" in str(e.value)
    assert not (tmp_path / "download").exists()  # nothing half-written


def test_a_bad_line_mid_cut_leaves_no_shards_and_no_scratch(tmp_path):
    good = tmp_path / "urls" / "a.jsonl"
    good.parent.mkdir()
    good.write_text(json.dumps({"url": "http://x.invalid/1"}) + "\n")
    (tmp_path / "urls" / "b.jsonl").write_text(json.dumps({"url": "u"}) + "\n{not json\n")
    with pytest.raises(InputError, match=r"b.jsonl:2: not JSON"):
        cut(tmp_path / "urls", tmp_path / "download", captions_optional=True)
    inputs = tmp_path / "download" / "_inputs"
    assert list(inputs.iterdir()) == []


def test_url_list_parts_on_s3_cut_like_local_ones(s3_bucket, tmp_path):
    local = write_parts(tmp_path / "urls")
    for path in local:
        storage.write_bytes_atomic(storage.join(s3_bucket, "laion", path.name), path.read_bytes())
    remote = cut(storage.join(s3_bucket, "laion", "part-*.parquet"), tmp_path / "s3run")
    here = cut(tmp_path / "urls", tmp_path / "local")
    assert [p.read_bytes() for _, p in remote] == [p.read_bytes() for _, p in here]


def test_cli_names_a_missing_list(tmp_path, capsys):
    missing = str(tmp_path / "nothing" / "*.parquet")
    assert download_main([str(tmp_path / "run"), "--urls", missing]) == 2
    assert missing in capsys.readouterr().err
