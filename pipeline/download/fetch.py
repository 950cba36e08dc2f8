"""Safe fetching of one URL: a total deadline, an address policy on every hop, robots headers.

img2dataset fetches with `urllib.urlopen(timeout=...)`, whose timeout bounds each socket
operation, not the request: a server that sends one byte every few seconds holds a thread
forever. It also connects wherever a name resolves. So each request here:
- resolves the host itself (with the deadline) and refuses private, loopback, link-local,
  multicast, reserved and cloud-metadata addresses unless the config allows them; the
  connection then goes to the very address that was checked, so a name that re-resolves to a
  private address between check and connect (DNS rebinding) cannot slip through;
- follows redirects by hand, re-checking every hop and stopping on loops;
- runs under a watchdog that shuts the socket down when the total deadline passes, whatever
  the server is doing;
- honours `X-Robots-Tag: noai / noimageai` and a byte cap (Content-Length and actual bytes).
It never raises: every outcome is a `FetchResult` with a reason class from `pipeline.core.reasons`.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import functools
import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from pipeline.core import reasons

# Cloud metadata services that are not covered by "not global" on every platform.
_METADATA_NETWORKS = [ipaddress.ip_network(n) for n in ("169.254.169.254/32", "fd00:ec2::254/128")]
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


@dataclass
class FetchConfig:
    timeout_s: float = 10.0  # total deadline per request: DNS, connect, redirects, headers, body
    socket_timeout_s: float = 5.0  # per socket operation, within the total deadline
    max_bytes: int = 50_000_000
    max_redirects: int = 5
    allow_loopback: bool = False  # tests and the demo serve from 127.0.0.1
    allowed_networks: list[str] = field(default_factory=list)  # CIDRs to allow, e.g. a mirror
    robots_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    user_agent_token: str = "rectiflow"
    ca_bundle: str | None = None  # PEM of CAs to trust instead of the system store (a mirror)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.socket_timeout_s <= 0:
            raise ValueError("timeout_s and socket_timeout_s must be positive")
        if self.max_redirects < 0 or self.max_bytes <= 0:
            raise ValueError("max_redirects must be >= 0 and max_bytes > 0")
        for cidr in self.allowed_networks:
            ipaddress.ip_network(cidr)  # fail at config time on a typo


@dataclass
class FetchResult:
    url: str
    data: bytes | None = None
    reason: str | None = None  # None on success
    error: str | None = None
    http_status: int | None = None
    retry_after_s: float | None = None  # from a 429/503 Retry-After header
    final_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class Refused(Exception):
    """A request stopped by policy or by the response; carries its reason class."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class _Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def op_timeout(self, socket_timeout: float) -> float:
        remaining = self.remaining()
        if remaining <= 0:
            raise TimeoutError("total deadline passed")
        return min(socket_timeout, remaining)


class _Watchdog:
    """One thread per process that shuts down sockets whose request deadline has passed."""

    def __init__(self):
        self._heap: list[tuple[float, int, list]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, at: float, sock: socket.socket) -> list:
        entry = [sock]  # emptied by `release` when the request ends in time
        with self._cond:
            heapq.heappush(self._heap, (at, next(self._ids), entry))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="fetch-watchdog")
                self._thread.start()
            self._cond.notify()
        return entry

    @staticmethod
    def release(entry: list) -> None:
        entry.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, entry = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            if entry:
                try:
                    entry[0].shutdown(socket.SHUT_RDWR)  # wakes a blocked recv with EOF
                except OSError:
                    pass


_WATCHDOG = _Watchdog()
# getaddrinfo cannot be interrupted: it runs here so the caller can stop waiting at the deadline.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="resolve")


def fetch(url: str, config: FetchConfig) -> FetchResult:
    """GET `url` under the config's policy; never raises."""
    deadline = _Deadline(config.timeout_s)
    result = FetchResult(url=url)
    seen: set[str] = set()
    current = url
    try:
        for _ in range(config.max_redirects + 1):
            if current in seen:
                raise Refused(reasons.REDIRECT_LOOP, f"redirect loop back to {current}")
            seen.add(current)
            location = _request_once(current, config, deadline, result)
            if location is None:
                result.final_url = current
                return result
            current = urljoin(current, location)
        raise Refused(reasons.TOO_MANY_REDIRECTS, f"more than {config.max_redirects} redirects")
    except Refused as e:
        result.reason, result.error, result.retry_after_s = e.reason, str(e), e.retry_after_s
    except Exception as e:  # noqa: BLE001 -- every failure becomes a classified row
        result.reason = reasons.TIMEOUT if deadline.expired() else reasons.classify_exception(e)
        result.error = f"{type(e).__name__}: {e}"
    result.data = None
    return result


def _request_once(url: str, config: FetchConfig, deadline: _Deadline, result: FetchResult):
    """One hop: returns a redirect location, or None with `result` filled in."""
    scheme, host, port, path = _split_url(url)
    family, sockaddr = resolve_allowed(host, port, config, deadline)
    timeout = deadline.op_timeout(config.socket_timeout_s)
    if scheme == "https":
        conn = _PinnedHTTPSConnection(host, port, timeout=timeout, context=_tls_context(config.ca_bundle))
    else:
        conn = _PinnedHTTPConnection(host, port, timeout=timeout)
    conn.pinned = (family, sockaddr)
    try:
        conn.connect()
        entry = _WATCHDOG.watch(deadline.at, conn.sock)
        try:
            return _exchange(conn, path, config, deadline, result)
        finally:
            _WATCHDOG.release(entry)
    finally:
        conn.close()


def _exchange(conn, path: str, config: FetchConfig, deadline: _Deadline, result: FetchResult):
    sock = conn.sock  # http.client drops conn.sock when the server closes after the response
    sock.settimeout(deadline.op_timeout(config.socket_timeout_s))
    conn.request("GET", path, headers={"User-Agent": _user_agent(config), "Accept": "image/*"})
    response = conn.getresponse()
    result.http_status = response.status
    if response.status in _REDIRECT_STATUSES and response.getheader("Location"):
        return response.getheader("Location")
    if response.status >= 400:
        retry_after = parse_retry_after(response.getheader("Retry-After"))
        raise Refused(reasons.http_reason(response.status), response.reason, retry_after)
    if response.status != 200:
        raise Refused(reasons.http_reason(response.status), f"unexpected status {response.status}")
    if robots_opt_out(response.headers.get_all("X-Robots-Tag") or [], config):
        raise Refused(reasons.ROBOTS_OPT_OUT, "X-Robots-Tag forbids use")
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > config.max_bytes:
        raise Refused(reasons.TOO_LARGE, f"Content-Length {length} > {config.max_bytes}")
    result.data = _read_body(sock, response, config, deadline)
    return None


def _read_body(sock, response, config: FetchConfig, deadline: _Deadline) -> bytes:
    chunks, size = [], 0
    while True:
        sock.settimeout(deadline.op_timeout(config.socket_timeout_s))
        chunk = response.read1(1 << 16)  # at most one recv: the deadline is checked per chunk
        if not chunk:
            break
        size += len(chunk)
        if size > config.max_bytes:
            raise Refused(reasons.TOO_LARGE, f"body larger than {config.max_bytes} bytes")
        chunks.append(chunk)
    if deadline.expired():  # the watchdog's shutdown reads as EOF: not a complete body
        raise TimeoutError("total deadline passed while reading the body")
    return b"".join(chunks)


def _split_url(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise Refused(reasons.BAD_URL, str(e)) from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(reasons.UNSUPPORTED_SCHEME, f"scheme {scheme!r} is not http(s)")
    if not parts.hostname:
        raise Refused(reasons.BAD_URL, f"no host in {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(c in path for c in " \t\r\n"):
        raise Refused(reasons.BAD_URL, "whitespace in the URL path")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def resolve_allowed(host: str, port: int, config: FetchConfig, deadline: _Deadline):
    """(family, sockaddr) to connect to; refuses if any address of the host is not allowed."""
    try:
        addresses = [ipaddress.ip_address(host)]  # a literal IP: no DNS at all
        infos = None
    except ValueError:
        future = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        infos = future.result(timeout=max(deadline.remaining(), 0.001))
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not address_allowed(address, config):
            raise Refused(reasons.BLOCKED_ADDRESS, f"{host} -> {address} is not a public address")
    if infos is None:
        family = socket.AF_INET6 if addresses[0].version == 6 else socket.AF_INET
        return family, (str(addresses[0]), port)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def address_allowed(address, config: FetchConfig) -> bool:
    """Public unicast addresses only, plus loopback / listed networks when configured."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for cidr in config.allowed_networks:
        network = ipaddress.ip_network(cidr)
        if address.version == network.version and address in network:
            return True
    if address.is_loopback:
        return config.allow_loopback
    if any(address.version == n.version and address in n for n in _METADATA_NETWORKS):
        return False
    return address.is_global and not address.is_multicast


def robots_opt_out(values: list[str], config: FetchConfig) -> bool:
    """X-Robots-Tag: a directive list, optionally scoped to a user agent (`bot: noai`)."""
    wanted = {d.lower() for d in config.robots_directives}
    for value in values:
        scope, _, directives = value.rpartition(":")
        if scope and scope.strip().lower() != config.user_agent_token.lower():
            continue
        if wanted & {d.strip().lower() for d in directives.split(",")}:
            return True
    return False


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@functools.lru_cache(maxsize=8)
def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Certificate and host name verification always on; one context per process and bundle."""
    return ssl.create_default_context(cafile=ca_bundle)


def _user_agent(config: FetchConfig) -> str:
    return f"Mozilla/5.0 (compatible; {config.user_agent_token}; +https://github.com/rectiflow)"


def _connect_pinned(conn) -> socket.socket:
    family, sockaddr = conn.pinned
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(conn.timeout)
        sock.connect(sockaddr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address while sending the original Host header."""

    pinned: tuple

    def connect(self):
        self.sock = _connect_pinned(self)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    pinned: tuple

    def connect(self):
        self.sock = self._context.wrap_socket(_connect_pinned(self), server_hostname=self.host)
