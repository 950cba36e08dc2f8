"""Integration: a real local Ray cluster, the curation job submitted through the Jobs API.

The test starts its own head node (`ray start --head --block`, 2 CPUs, dashboard on
127.0.0.1, its own --temp-dir) as the leader of a new process group, submits
`python -m ray_jobs.curate` with the repository as working dir, waits, checks the run
directory, and ends exactly the processes it started by killing that process group. Every
Python process of the cluster loads the network guard, so nothing can leave 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_factory import tiny_clip_dir

pytestmark = [pytest.mark.timeout(420), pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
NETGUARD = REPO / "tests" / "netguard"
# Look-ups that Ray's own helpers try at start-up (cloud metadata, usage stats even when
# disabled). The guard refuses them before any packet leaves; anything else fails the test.
RAY_STARTUP_PROBES = ("169.254.169.254", "metadata.google.internal", "usage-stats.ray.io")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clip_dir(request, tmp_path_factory) -> Path:
    return tiny_clip_dir(request, tmp_path_factory)


@pytest.fixture
def ray_cluster(tmp_path, monkeypatch):
    """A head node on 127.0.0.1; yields the dashboard URL; stops everything it started."""
    # Ray's token authentication with a token of our own, so neither side reads ~/.ray.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    temp_dir = tempfile.mkdtemp(prefix="rf_ray_", dir="/tmp")  # Ray's socket paths must be short
    dashboard_port = free_port()
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        # Ray otherwise swaps 127.0.0.1 for this host's network address; with "clusters" off
        # it keeps every node address on loopback (one machine is all this test needs).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        NETGUARD_LOG=str(tmp_path / "netguard.log"),
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), env.get("PYTHONPATH")]))
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--num-cpus", "2", "--num-gpus", "0", "--port", str(free_port()),
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port), "--temp-dir", temp_dir,
        "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats",
    ]
    log = open(tmp_path / "ray_start.log", "wb")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, head, tmp_path / "ray_start.log")
        yield url
    finally:
        _stop_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_client(url: str):
    """A Jobs API client that sends this cluster's token explicitly.

    Ray caches the token it loads once per process; an embedded Ray started by an earlier
    test in the same pytest process would otherwise make the client send a stale one.
    """
    from ray.job_submission import JobSubmissionClient

    token = os.environ["RAY_AUTH_TOKEN"]
    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            job_client(url).list_jobs()
            return
        except Exception:  # noqa: BLE001 -- not up yet
            time.sleep(1)
    pytest.fail(f"the Ray dashboard did not come up within {timeout_s} s")


def _stop_process_group(head: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group that `ray start` leads: only ours."""
    for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(head.pid, 0)
            except ProcessLookupError:
                head.wait(timeout=5)
                return
            time.sleep(0.2)
    head.wait(timeout=5)


def _submit(client, entrypoint: str, runtime_env: dict, timeout_s: float = 60) -> str:
    """Submit, retrying while the node's job agent is still starting (the dashboard is up first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _write_url_list(server, path: Path) -> list[str]:
    files = ["astronaut.jpg", "coffee.jpg", "chelsea.png", "rotated.jpg", "truncated.jpg",
             "huge.png", "status/404", "page.jpg"]
    captions = [f"a photo of {name.split('.')[0]} on a wooden table" for name in files]
    pq.write_table(pa.table({"url": [server.url(f) for f in files], "caption": captions}), path)
    return files


def test_curate_job_runs_on_a_local_cluster(ray_cluster, image_server, clip_dir, tmp_path):
    from ray.job_submission import JobStatus

    _write_url_list(image_server, tmp_path / "urls.parquet")
    run_dir = tmp_path / "run"
    entrypoint = (
        "python -m ray_jobs.curate --config configs/curate_demo.toml "
        f"--run.out_dir={run_dir} --run.urls={tmp_path / 'urls.parquet'} "
        f"--score.model={clip_dir} --download.rows_per_shard=4 --download.processes_count=0"
    )
    client = job_client(ray_cluster)
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "__pycache__"]}
    job = _submit(client, entrypoint, runtime_env)
    deadline = time.monotonic() + 180
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]

    download = pa.concat_tables(
        [pq.read_table(p) for p in sorted((run_dir / "download").glob("0*.parquet"))]
    ).to_pylist()
    reasons = {r["url"].rsplit("/", 1)[-1]: r["download_reason"] for r in download}
    assert reasons["astronaut.jpg"] is None and reasons["404"] == "http_404"
    assert reasons["huge.png"] == "too_many_pixels" and reasons["page.jpg"] == "not_an_image"
    scored = pa.concat_tables(
        [pq.read_table(p) for p in sorted((run_dir / "score").glob("*.parquet"))]
    )
    ok = {r["uid"] for r in download if r["download_status"] == "success"}
    assert set(scored["uid"].to_pylist()) == ok and scored["score_clip"].null_count == 0
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "select").glob("0*.parquet"))])
    assert set(kept["uid"].to_pylist()) == ok
    assert (run_dir / "config.resolved.toml").exists()
    assert "download" in logs and "select" in logs  # the funnel printed at the end
    log = tmp_path / "netguard.log"
    blocked = log.read_text().splitlines() if log.exists() else []
    assert [v for v in blocked if not any(p in v for p in RAY_STARTUP_PROBES)] == []
