"""Safe fetching against a real server on 127.0.0.1: deadlines, address policy, redirects."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from pipeline.core import reasons
from pipeline.download.fetch import FetchConfig, address_allowed, fetch, parse_retry_after

pytestmark = pytest.mark.timeout(60)
LOCAL = FetchConfig(allow_loopback=True, timeout_s=1.0, socket_timeout_s=1.0)


def test_photo_and_redirect_chain(image_server):
    direct = fetch(image_server.url("astronaut.jpg"), LOCAL)
    redirected = fetch(image_server.url("redirect/3/astronaut.jpg"), LOCAL)
    assert direct.ok and direct.http_status == 200 and direct.data[:3] == b"\xff\xd8\xff"
    assert redirected.ok and redirected.data == direct.data
    assert redirected.final_url.endswith("/astronaut.jpg")


def test_total_deadline_stops_a_server_that_drips(image_server):
    # Every piece arrives well within the socket timeout; only the total deadline fires.
    config = FetchConfig(allow_loopback=True, timeout_s=0.8, socket_timeout_s=2.0)
    start = time.perf_counter()
    result = fetch(image_server.url("drip/3/astronaut.jpg"), config)
    elapsed = time.perf_counter() - start
    assert result.reason == "timeout" and result.data is None
    # the 0.8 s deadline, not the 3 s drip; the upper margin is for a loaded 2-core machine
    assert 0.7 < elapsed < 2.5


def test_total_deadline_covers_slow_headers(image_server):
    start = time.perf_counter()
    result = fetch(image_server.url("sleep/3/astronaut.jpg"), LOCAL)
    # the 1 s deadline, well before the server's 3 s sleep ends (margin for a loaded machine)
    assert result.reason == "timeout" and time.perf_counter() - start < 2.5


@pytest.mark.parametrize(
    ("path", "reason", "retryable"),
    [
        ("missing.jpg", "http_404", False),
        ("status/500", "http_500", True),
        ("status/503", "http_503", True),
        ("status/403", "http_403", False),
        ("redirect-loop", "redirect_loop", False),
        ("redirect/9/astronaut.jpg", "too_many_redirects", False),
        ("robots/noai/astronaut.jpg", "robots_opt_out", False),
        ("robots/rectiflow%3A%20noimageai/astronaut.jpg", "robots_opt_out", False),
    ],
)
def test_failures_are_classified(image_server, path, reason, retryable):
    result = fetch(image_server.url(path), LOCAL)
    assert result.reason == reason and result.data is None
    assert reasons.is_retryable(result.reason) == retryable


def test_robots_directive_for_another_crawler_is_ignored(image_server):
    assert fetch(image_server.url("robots/otherbot%3A%20noai/astronaut.jpg"), LOCAL).ok


def test_429_keeps_retry_after(image_server):
    result = fetch(image_server.url("status/429?retry_after=7"), LOCAL)
    assert (result.reason, result.retry_after_s) == ("http_429", 7.0)
    assert reasons.is_retryable(result.reason)


def test_max_bytes(image_server):
    result = fetch(image_server.url("astronaut.jpg"), FetchConfig(allow_loopback=True, max_bytes=1000))
    assert result.reason == "too_large"


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/x.jpg", "http://192.168.1.20:8080/x.jpg", "http://169.254.169.254/latest/",
     "http://[fe80::1]/x.jpg", "http://[::ffff:172.16.0.1]/x.jpg", "http://0.0.0.0/x.jpg"],
)
def test_private_addresses_are_refused_before_any_connect(url):
    # The network guard fails the test if a connect to these addresses were even attempted.
    assert fetch(url, LOCAL).reason == "blocked_address"


def test_loopback_is_refused_by_default(image_server):
    before = image_server.hits["/coffee.jpg"]
    assert fetch(image_server.url("coffee.jpg"), FetchConfig()).reason == "blocked_address"
    assert image_server.hits["/coffee.jpg"] == before  # no request reached the server


def test_every_redirect_hop_is_checked(image_server):
    url = image_server.url("goto?url=http%3A%2F%2F10.9.9.9%2Fsecret")
    result = fetch(url, LOCAL)
    assert (result.reason, result.http_status) == ("blocked_address", 302)


def test_a_name_resolving_to_a_private_address_is_refused(monkeypatch):
    # DNS rebinding: the name resolves to a private address; the fetcher must refuse it and
    # connect nowhere (the guard would report a connect to 10.0.0.7).
    def resolve(host, port, *args, **kwargs):
        assert host == "rebind.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert fetch("http://rebind.example/x.jpg", LOCAL).reason == "blocked_address"


def test_unknown_host_is_a_dns_failure_without_a_query():
    assert fetch("http://no-such-host.invalid/x.jpg", LOCAL).reason == "dns"


def test_other_schemes_and_bad_urls():
    assert fetch("file:///etc/passwd", LOCAL).reason == "unsupported_scheme"
    assert fetch("http://127.0.0.1:99999/x", LOCAL).reason == "bad_url"


def test_closed_port_is_a_connect_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connection refused
        result = fetch(f"http://127.0.0.1:{port}/x.jpg", LOCAL)
    assert result.reason == "connect" and reasons.is_retryable(result.reason)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
     ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False), ("127.0.0.1", False),
     ("::1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.1", False),
     ("fd00:ec2::254", False), ("::ffff:10.0.0.1", False), ("0.0.0.0", False)],
)
def test_address_policy(address, allowed):
    assert address_allowed(ipaddress.ip_address(address), FetchConfig()) == allowed


def test_allowlist_networks():
    config = FetchConfig(allowed_networks=["10.20.0.0/16"])
    assert address_allowed(ipaddress.ip_address("10.20.3.4"), config)
    assert not address_allowed(ipaddress.ip_address("10.21.3.4"), config)


def test_retry_after_parsing():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < parse_retry_after(date) <= 61


def test_the_network_guard_itself_catches_traffic(network_guard):
    with pytest.raises(network_guard.NetworkGuardViolation):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)  # TEST-NET-1: never routed
    with pytest.raises(network_guard.NetworkGuardViolation):
        socket.getaddrinfo("example.com", 80)
    assert len(network_guard.take_violations()) == 2  # recorded (and cleared for teardown)


@pytest.fixture
def tls_server(image_server, tmp_path):
    """HTTPS on 127.0.0.1 with a self-signed certificate for the name "localhost"."""
    import http.server
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    root = str(image_server._server.root)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=root)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}", str(cert)
    server.shutdown()
    server.server_close()


def test_https_verifies_the_certificate_of_the_pinned_address(tls_server):
    base, cert = tls_server
    # The connection goes to the checked 127.0.0.1 while TLS still verifies "localhost".
    untrusted = fetch(f"{base}/astronaut.jpg", LOCAL)
    assert untrusted.reason == "tls_error"
    trusted = FetchConfig(allow_loopback=True, timeout_s=5.0, ca_bundle=cert)
    result = fetch(f"{base}/astronaut.jpg", trusted)
    assert result.ok and result.data[:3] == b"\xff\xd8\xff"
