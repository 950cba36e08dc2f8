"""A real S3-API server on 127.0.0.1 for tests: moto's server mode, as s3fs's own tests use.

`MotoS3Server` starts `python -m moto.server` on a free loopback port in its own process
(so Ray workers and subprocesses reach it too) and stops it by pid. The fixtures:
- `moto_s3` (session): the running server's endpoint URL;
- `s3_bucket` (per test): a fresh bucket, with AWS_ENDPOINT_URL and dummy credentials set
  for the test (and its children), as "s3://<bucket>".
Use them from a test module with `from s3_server import moto_s3, s3_bucket  # noqa: F401`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

# Dummy credentials and a region, so botocore never looks for real ones (no instance
# metadata probe, no ~/.aws files).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3Server:
    """`with MotoS3Server() as endpoint:` a moto S3 server on 127.0.0.1 for the block."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, **S3_ENV}
        self.process = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self.endpoint
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within 30 s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # by its own pid: the process this object started
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the server with a plain PUT (no client library needed)."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    urllib.request.urlopen(request, timeout=10).close()
    return name


@pytest.fixture(scope="session")
def moto_s3():
    with MotoS3Server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_s3, monkeypatch) -> str:
    set_s3_env(monkeypatch, moto_s3)
    return f"s3://{make_bucket(moto_s3)}"
