"""A download killed with SIGKILL mid-way and rerun gives the same uids and byte-identical shards.

The killed run uses img2dataset's multiprocessing distributor in a child process group, with
the network guard active in every child (sitecustomize), so this also checks that the
spawned workers send nothing beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.decode import DecodeConfig
from pipeline.core.runners import RunnerConfig
from pipeline.download.fetch import FetchConfig
from pipeline.download.stage import DownloadConfig, run_download

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[3]
PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.png", "missing.jpg", "page.jpg", "cmyk.jpg")
SHARDS, ROWS_PER_SHARD = 8, 3
OPTIONS = {"rows_per_shard": ROWS_PER_SHARD, "thread_count": 1}


def config(processes: int) -> DownloadConfig:
    return DownloadConfig(
        **OPTIONS, processes_count=processes,
        fetch=FetchConfig(allow_loopback=True, timeout_s=5.0),
        decode=DecodeConfig(min_size=32, image_size=64),
    )


def shard_files(run_dir: Path) -> dict[str, bytes]:
    stage = run_dir / "download"
    return {p.name: p.read_bytes() for p in sorted(stage.glob("0*")) if p.suffix in (".tar", ".parquet")}


def start_killable_run(urls: Path, out: Path) -> subprocess.Popen:
    overrides = [f"--download.{k}={v}" for k, v in OPTIONS.items()]
    overrides += ["--download.processes_count=1", "--download.fetch.allow_loopback=true",
                  "--download.fetch.timeout_s=5.0", "--download.decode.min_size=32",
                  "--download.decode.image_size=64"]
    code = "import sys; from pipeline.download.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--urls", str(urls), "--out", str(out), *overrides],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_sigkill_mid_run_then_rerun_gives_identical_shards(image_server, guarded_children, tmp_path):
    # Each request waits 0.15 s on the server, so the run is still going when it is killed.
    rows = [{"url": image_server.url(f"sleep/0.15/{PHOTOS[i % len(PHOTOS)]}"), "caption": f"row {i}"}
            for i in range(SHARDS * ROWS_PER_SHARD)]
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))

    killed = tmp_path / "killed"
    process = start_killable_run(urls, killed)
    deadline = time.monotonic() + 120
    while len(list((killed / "download").glob("*.manifest.json"))) < 2:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never completed a shard"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job: driver and pool workers
    process.wait(timeout=30)
    process.stderr.close()
    done_before = len(list((killed / "download").glob("*.manifest.json")))
    assert 2 <= done_before < SHARDS, "kill landed after the run finished"

    run_download(config(0), RunnerConfig(), urls, killed)  # resume in-process
    clean = tmp_path / "clean"
    run_download(config(0), RunnerConfig(), urls, clean)

    resumed, reference = shard_files(killed), shard_files(clean)
    assert len(reference) == 2 * SHARDS
    assert resumed == reference  # same shards, byte for byte: nothing lost or duplicated
    assert not list((killed / "download").glob(".*tmp*"))  # no half-written leftovers


def test_child_processes_are_guarded(guarded_children):
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=0.1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ, timeout=60)
    assert result.returncode != 0 and "network guard: connection to" in result.stderr
    found = guarded_children.take_violations()  # recorded through $NETGUARD_LOG; cleared here
    assert any("192.0.2.1" in line for line in found)
