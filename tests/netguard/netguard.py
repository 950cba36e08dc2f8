"""A network guard for tests: only loopback traffic and loopback names, everything else fails.

`install()` patches the socket module so that connecting or sending to a non-loopback
address, or resolving any name other than localhost, raises `NetworkGuardViolation` and is
recorded (in `violations`, and in the file named by $NETGUARD_LOG for child processes, which
load this through `sitecustomize`). Names under the reserved `.invalid` TLD answer "not
found" without a query, so "unknown host" tests make no real DNS look-up either.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

LOG_ENV = "NETGUARD_LOG"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
violations: list[str] = []
_lock = threading.Lock()
_real: dict[str, object] = {}


class NetworkGuardViolation(OSError):
    """Traffic to somewhere other than 127.0.0.1 (the test must not do that)."""


# Raised as the errors code already handles offline (a failed look-up, a refused connection),
# so the code under test behaves as on an offline machine; the record is what fails the test.
class LookupViolation(NetworkGuardViolation, socket.gaierror):
    pass


class ConnectViolation(NetworkGuardViolation, ConnectionRefusedError):
    pass


def _violation(what: str, kind: type[NetworkGuardViolation]) -> NetworkGuardViolation:
    message = f"network guard: {what} (pid {os.getpid()})"
    with _lock:
        violations.append(message)
        path = os.environ.get(LOG_ENV)
        if path:
            with open(path, "a") as f:
                f.write(message + "\n")
    return kind(message)


def _is_local_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True


def check_name(host) -> None:
    if host is None:
        return
    name = host.decode() if isinstance(host, bytes) else str(host)
    name = name.strip("[]").rstrip(".").lower()
    if name in _LOOPBACK_NAMES or name == "" or _is_ip(name):
        return  # an IP literal makes no query; connecting to it is checked in connect
    if name.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (network guard)")
    raise _violation(f"name lookup for {name!r}", LookupViolation)


def check_address(family, address) -> None:
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return
    if not _is_local_ip(str(address[0])):
        raise _violation(f"connection to {address!r}", ConnectViolation)


def _guarded_getaddrinfo(host, *args, **kwargs):
    check_name(host)
    return _real["getaddrinfo"](host, *args, **kwargs)


def _guarded_gethostbyname(host):
    check_name(host)
    return _real["gethostbyname"](host)


def _guarded_gethostbyname_ex(host):
    check_name(host)
    return _real["gethostbyname_ex"](host)


def _guarded_connect(self, address):
    check_address(self.family, address)
    return _real["connect"](self, address)


def _guarded_connect_ex(self, address):
    check_address(self.family, address)
    return _real["connect_ex"](self, address)


def _guarded_sendto(self, data, *args):
    check_address(self.family, args[-1])
    return _real["sendto"](self, data, *args)


def install() -> None:
    """Patch the socket module (idempotent)."""
    if _real:
        return
    _real.update(getaddrinfo=socket.getaddrinfo, gethostbyname=socket.gethostbyname,
                 gethostbyname_ex=socket.gethostbyname_ex, connect=socket.socket.connect,
                 connect_ex=socket.socket.connect_ex, sendto=socket.socket.sendto)
    socket.getaddrinfo = _guarded_getaddrinfo
    socket.gethostbyname = _guarded_gethostbyname
    socket.gethostbyname_ex = _guarded_gethostbyname_ex
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.socket.sendto = _guarded_sendto


def take_violations() -> list[str]:
    """Violations recorded in this process and in guarded child processes since the last call."""
    with _lock:
        found = list(violations)
        violations.clear()
        path = os.environ.get(LOG_ENV)
        if path and os.path.exists(path):
            with open(path) as f:
                found += [line.strip() for line in f if line.strip()]
            os.remove(path)
    return list(dict.fromkeys(found))
