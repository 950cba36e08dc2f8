"""img2dataset's real output (run here on images served from 127.0.0.1), ingested."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import jpeg, table

from pipeline.cli import main as rectiflow
from pipeline.download.local_server import LocalImageServer

pytestmark = pytest.mark.timeout(120)


def test_ingests_what_img2dataset_wrote(tmp_path):
    from img2dataset import download

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(jpeg(f"i2d{i}", (90, 70)))
    out = tmp_path / "i2d"
    with LocalImageServer(images) as server:
        urls = [server.url(f"{i}.jpg") for i in range(4)] + [server.url("missing.jpg")]
        pq.write_table(pa.table({"url": urls, "caption": [f"cap {i}" for i in range(5)]}),
                       tmp_path / "urls.parquet")
        download(url_list=str(tmp_path / "urls.parquet"), input_format="parquet",
                 url_col="url", caption_col="caption", output_format="webdataset",
                 output_folder=str(out), processes_count=1, thread_count=2,
                 resize_mode="no", number_sample_per_shard=3, distributor="multiprocessing",
                 disallowed_header_directives=[], timeout=5, retries=0)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    run = tmp_path / "run"
    assert rectiflow(["ingest", str(run), "--webdataset", f"{out}/{{00000..00001}}.tar",
                      "--ingest.decode.min_size=16"]) == 0
    rows = table(run)
    assert sorted(r["caption"] for r in rows) == [f"cap {i}" for i in range(4)]
    assert all(r["download_status"] == "success" and r["download_width"] == 90 for r in rows)
    # img2dataset's key (shard digits + row digits) becomes the uid; the 404 left no member.
    assert sorted(r["uid"] for r in rows) == ["000000", "000001", "000002", "000010"]
