"""Why a download failed: short snake_case classes, which of them are worth retrying.

Every failed sample gets exactly one reason from this module, so the funnel can be counted
and `rectiflow download --retry-failed` can pick out the transient failures (timeouts, 429,
5xx, connection errors) without parsing free text. The raw message is kept beside the
reason (`download_error`) for debugging only.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl

# Fetch failures.
DNS = "dns"  # the host name does not resolve
CONNECT = "connect"  # refused, unreachable, reset before a response
CONNECTION_LOST = "connection_lost"  # the peer closed or reset the connection mid-response
TIMEOUT = "timeout"  # the request's total deadline passed (or a socket timeout)
TLS_ERROR = "tls_error"
BLOCKED_ADDRESS = "blocked_address"  # private, loopback, link-local, metadata, ... (policy)
UNSUPPORTED_SCHEME = "unsupported_scheme"  # not http(s)
BAD_URL = "bad_url"
TOO_MANY_REDIRECTS = "too_many_redirects"
REDIRECT_LOOP = "redirect_loop"
ROBOTS_OPT_OUT = "robots_opt_out"  # X-Robots-Tag noai / noimageai
TOO_LARGE = "too_large"  # body larger than max_bytes
PROTOCOL_ERROR = "protocol_error"  # malformed HTTP
FETCH_ERROR = "fetch_error"  # anything else while fetching
# Content failures.
EMPTY_BODY = "empty_body"
NOT_AN_IMAGE = "not_an_image"  # HTML, text, or a format Pillow does not know
DECODE_ERROR = "decode_error"  # truncated or corrupt image data
TOO_MANY_PIXELS = "too_many_pixels"  # header size above the pixel cap (checked before decode)
TOO_SMALL = "too_small"
# Bookkeeping.
DUPLICATE_UID = "duplicate_uid"  # a repeated input row (same id, or same url and caption)
MISSING_URL = "missing_url"

_RETRYABLE = {TIMEOUT, CONNECT, CONNECTION_LOST, "http_408", "http_429"}


def http_reason(status: int) -> str:
    """`http_404`, `http_500`, ...: one class per status code."""
    return f"http_{status}"


def is_retryable(reason: str | None) -> bool:
    """Transient failures that a later attempt may fix: timeouts, 408, 429, 5xx, connection."""
    if reason is None:
        return False
    if reason in _RETRYABLE:
        return True
    return reason.startswith("http_5") and len(reason) == 8


def reason_family(reason: str) -> str:
    """Coarse class for summaries: `http_404` -> `http_4xx`, others unchanged."""
    if reason.startswith("http_") and len(reason) == 8 and reason[5:].isdigit():
        return reason if reason == "http_429" else f"http_{reason[5]}xx"
    return reason


def classify_exception(err: BaseException) -> str:
    """The reason class of an exception raised while fetching."""
    if isinstance(err, socket.gaierror):
        return DNS
    if isinstance(err, TimeoutError | socket.timeout):
        return TIMEOUT
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return TLS_ERROR
    if isinstance(err, http.client.IncompleteRead | ConnectionResetError | BrokenPipeError):
        return CONNECTION_LOST
    if isinstance(err, http.client.RemoteDisconnected):
        return CONNECTION_LOST
    if isinstance(err, http.client.HTTPException):
        return PROTOCOL_ERROR
    if isinstance(err, ConnectionError):
        return CONNECT
    if isinstance(err, OSError) and err.errno in _CONNECT_ERRNOS:
        return CONNECT
    return FETCH_ERROR


_CONNECT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNABORTED,
    errno.EADDRNOTAVAIL,
}
