"""The loopback-only network namespace that `make test` runs the Ray tests in (netns.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import netns
import pytest

IN_NAMESPACE = os.environ.get(netns.ENV) == "loopback-only"

# Run without the Python guard (no sitecustomize): the namespace alone must stop it.
PROBE = r"""
import json, socket, time
with socket.socket() as server, socket.socket() as client:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client.connect(server.getsockname())
    peer, _ = server.accept()
    client.sendall(b"ping")
    echoed = peer.recv(4)
    peer.close()
results = {"loopback": echoed.decode()}
for name, family, kind, address in [
        ("metadata_tcp", socket.AF_INET, socket.SOCK_STREAM, ("169.254.169.254", 80)),
        ("dns_udp", socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53))]:
    started = time.monotonic()
    with socket.socket(family, kind) as s:
        s.settimeout(10)
        try:
            s.connect(address) if kind == socket.SOCK_STREAM else s.sendto(b"x", address)
            code = 0
        except OSError as error:
            code = error.errno
    results[name] = [code, time.monotonic() - started]
print(json.dumps(results))
"""


@pytest.mark.netns
@pytest.mark.skipif(not IN_NAMESPACE, reason="runs only inside tests/netguard/netns.py's "
                    "namespace (make test's second pass)")
def test_only_loopback_works_and_the_rest_is_unreachable_at_once():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NETGUARD_LOG")}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["loopback"] == "ping"
    for name in ("metadata_tcp", "dns_udp"):
        code, seconds = results[name]
        assert code == errno.ENETUNREACH, (name, code, os.strerror(code))
        assert seconds < 2.0, (name, seconds)  # refused by the kernel, not a timeout (10 s)


# The launcher where unshare is refused (no root, user namespaces off), in a process of its own.
REFUSED = """
import errno, sys
import netns
def refused(flags):
    raise PermissionError(errno.EPERM, "Operation not permitted")
netns._unshare = refused
netns.main(sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces are Linux's")
def test_without_privileges_the_launcher_says_so_and_runs_the_command_guard_only():
    show = "import os; print(os.environ['RECTIFLOW_NETNS'])"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(netns.__file__)}
    done = subprocess.run([sys.executable, "-c", REFUSED, sys.executable, "-c", show], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "guard-only"
    assert "unshare failed" in done.stderr and "guard-only mode" in done.stderr
