"""Run a command in a private network namespace that has only loopback: `netns.py CMD ...`.

Why: Ray's helper processes (raylet, dashboard agents) probe cloud-metadata addresses at
start-up, outside the Python guard's reach (netguard.py patches Python sockets, and only in
processes that load it). In a namespace of their own with only `lo` up, no process of the
test run can send a packet off the machine: a connect to 169.254.169.254 fails at once with
"Network is unreachable", and 127.0.0.1 (all Ray needs) still works.

How: unshare(CLONE_NEWNET) as root, else with a user namespace that maps this user to root
(what `unshare -rn` does); bring `lo` up with an ioctl (no iproute2 needed); exec CMD with
$RECTIFLOW_NETNS = "loopback-only". Where neither works (no privileges, user namespaces
disabled, not Linux) it says so on stderr and execs CMD unchanged with $RECTIFLOW_NETNS =
"guard-only": the in-process guard of tests/conftest.py still applies, as before.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
ENV = "RECTIFLOW_NETNS"


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _enter_user_and_network_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)  # struct ifreq: name, flags, union padding
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _check_loopback() -> None:
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())


def enter_private_network() -> str | None:
    """Move this process into a loopback-only network namespace; None, or why it could not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    try:
        if os.geteuid() == 0:
            _unshare(CLONE_NEWNET)
        else:
            _enter_user_and_network_namespace()
    except OSError as error:
        return f"unshare failed: {error}"
    try:
        _loopback_up()
        _check_loopback()
    except OSError as error:  # the namespace is entered: no way back, so no fallback
        sys.exit(f"netns: entered a network namespace but loopback does not work: {error}")
    return None


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: netns.py COMMAND [ARG ...]")
    problem = enter_private_network()
    if problem is None:
        os.environ[ENV] = "loopback-only"
        print("netns: running in a private network namespace (loopback only)", file=sys.stderr)
    else:
        os.environ[ENV] = "guard-only"
        print(f"netns: {problem}; guard-only mode: the in-process network guard only",
              file=sys.stderr)
    sys.stderr.flush()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
