"""The download stage on Ray (img2dataset's ray_distributor): same shards as the local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.decode import DecodeConfig
from pipeline.core.runners import RunnerConfig
from pipeline.download.fetch import FetchConfig
from pipeline.download.stage import DownloadConfig, run_download

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


def shard_files(run_dir: Path) -> dict[str, bytes]:
    stage = run_dir / "download"
    return {p.name: p.read_bytes() for p in sorted(stage.glob("0*")) if p.suffix in (".tar", ".parquet")}


def test_ray_backend_matches_local_run(image_server, tmp_path):
    ray = pytest.importorskip("ray")
    names = ("astronaut.jpg", "missing.jpg", "coffee.jpg", "page.jpg", "chelsea.png")
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": image_server.url(n)}) + "\n" for n in names))
    config = DownloadConfig(rows_per_shard=3, thread_count=4, processes_count=0,
                            fetch=FetchConfig(allow_loopback=True, timeout_s=5.0),
                            decode=DecodeConfig(min_size=32, image_size=64))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifests = run_download(config, RunnerConfig(backend="ray"), urls, tmp_path / "ray")
    finally:
        ray.shutdown()
    run_download(config, RunnerConfig(backend="local"), urls, tmp_path / "local")
    assert [m.shard for m in manifests] == ["00000", "00001"]
    assert sum(m.rows_out for m in manifests) == 3
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
