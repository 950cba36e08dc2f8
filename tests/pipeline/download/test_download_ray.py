"""The download stage on Ray: same shards as the local run; shards run as bounded Ray tasks
(runner.concurrency in flight, runner.num_cpus each) and failed ones are retried, then named."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.core.decode import DecodeConfig
from pipeline.core.runners import RunnerConfig
from pipeline.download.fetch import FetchConfig
from pipeline.download.stage import DownloadConfig, run_download
from pipeline.download.tasks import ray_map

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


@pytest.fixture(scope="module")
def ray4():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def shard_files(run_dir: Path) -> dict[str, bytes]:
    stage = run_dir / "download"
    return {p.name: p.read_bytes() for p in sorted(stage.glob("0*")) if p.suffix in (".tar", ".parquet")}


def test_ray_backend_matches_local_run(ray4, image_server, tmp_path):
    names = ("astronaut.jpg", "missing.jpg", "coffee.jpg", "page.jpg", "chelsea.png")
    parts = tmp_path / "urls"
    parts.mkdir()
    for p, chunk in enumerate((names[:3], names[3:])):  # two parts: cut as two Ray tasks
        (parts / f"part-{p}.jsonl").write_text(
            "".join(json.dumps({"url": image_server.url(n), "caption": n}) + "\n" for n in chunk))
    config = DownloadConfig(rows_per_shard=2, thread_count=4, processes_count=0,
                            fetch=FetchConfig(allow_loopback=True, timeout_s=5.0),
                            decode=DecodeConfig(min_size=32, image_size=64))
    ray_runner = RunnerConfig(backend="ray", concurrency=2, num_cpus=1)
    manifests = run_download(config, ray_runner, parts, tmp_path / "ray")
    run_download(config, RunnerConfig(backend="local"), parts, tmp_path / "local")
    assert [m.shard for m in manifests] == ["00000", "00001", "00002"]
    assert sum(m.rows_out for m in manifests) == 3
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_ray_tasks_are_bounded_retried_and_failures_named(ray4, tmp_path):
    log = tmp_path / "spans"
    log.mkdir()

    def timed(i):  # nested: Ray ships it by value, the workers need not import this file
        start = time.time()
        time.sleep(0.4)
        (log / f"{i}-{start}").write_text(str(time.time()))

    def spans():
        found = [(float(p.name.split("-", 1)[1]), float(p.read_text())) for p in log.iterdir()]
        for p in log.iterdir():
            p.unlink()
        return found

    # runner.concurrency bounds the tasks in flight although Ray has CPUs for more
    assert not ray_map(timed, range(6), concurrency=2, num_cpus=0.5).failed
    first = spans()
    assert len(first) == 6 and _max_overlap(first) <= 2
    # runner.num_cpus is reserved per task: 4 CPUs / 2 each = at most 2 at once
    assert not ray_map(timed, range(6), concurrency=6, num_cpus=2).failed
    assert _max_overlap(spans()) <= 2

    marks = tmp_path / "marks"
    marks.mkdir()

    def flaky(name):  # fails on its first attempt only, or always for "bad"
        attempt = marks / f"{name}-{len(list(marks.glob(name + '-*')))}"
        attempt.write_text("")
        if name == "bad" or attempt.name.endswith("-0"):
            raise OSError(f"shard {name} broke")
        return name

    done = ray_map(flaky, ["a", "bad", "c"], concurrency=2, num_cpus=1, retries=2)
    assert done.results == {0: "a", 2: "c"} and done.attempts == {0: 2, 1: 3, 2: 2}
    assert done.failed == {1: "OSError: shard bad broke"}
