"""A static image server on 127.0.0.1 for tests, benchmarks and the demo, with failure routes.

Files under `root` are served as they are (`/astronaut.jpg`). Test routes reproduce what the
internet does to a downloader:
  /status/<code>[?retry_after=S]     that status (with Retry-After when given)
  /sleep/<seconds>/<file>            wait before answering
  /drip/<seconds>/<file>             headers at once, then the body spread over <seconds>
  /redirect-loop                     302 to itself
  /redirect/<n>/<file>               a chain of n redirects ending at <file>
  /robots/<tag>/<file>               the file with `X-Robots-Tag: <tag>` (tag URL-quoted)
  /goto?url=<absolute url>           302 to any URL (redirects to private addresses)
  /flaky/<n>/<code>/<file>[?retry_after=S]   <code> for the first n requests, then the file
The server binds 127.0.0.1 only and runs in a daemon thread; `stop()` ends it and any slow
responses still in flight.
"""

from __future__ import annotations

import argparse
import mimetypes
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 -- quiet: tests read results, not logs
        pass

    def do_GET(self):  # noqa: N802 -- http.server's naming
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segments = [s for s in parts.path.split("/") if s]
        self.server.hits[parts.path] += 1
        route = _ROUTES.get(segments[0] if segments else "", None)
        try:
            if route is None:
                self._send_file("/".join(segments))
            else:
                route(self, segments[1:], query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (deadline tests do this on purpose)

    def _send_status(self, code: int, headers: dict[str, str] | None = None):
        body = f"status {code}\n".encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, name: str, headers: dict[str, str] | None = None, drip_s: float = 0.0):
        path = (self.server.root / name).resolve()
        if self.server.root not in path.parents or not path.is_file():
            return self._send_status(404)
        body = path.read_bytes()
        self.send_response(200)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if drip_s <= 0:
            self.wfile.write(body)
            return
        steps = 50
        for i in range(steps):  # one small piece at a time: each recv succeeds quickly
            if self.server.stopping.wait(drip_s / steps):
                return
            self.wfile.write(body[i * len(body) // steps : (i + 1) * len(body) // steps])
            self.wfile.flush()

    def route_status(self, rest, query):
        headers = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
        self._send_status(int(rest[0]), headers)

    def route_sleep(self, rest, query):
        if not self.server.stopping.wait(float(rest[0])):
            self._send_file("/".join(rest[1:]))

    def route_drip(self, rest, query):
        self._send_file("/".join(rest[1:]), drip_s=float(rest[0]))

    def route_redirect_loop(self, rest, query):
        self._redirect("/redirect-loop")

    def route_redirect(self, rest, query):
        count = int(rest[0])
        target = "/".join(rest[1:])
        self._redirect(f"/redirect/{count - 1}/{target}" if count > 1 else f"/{target}")

    def route_robots(self, rest, query):
        self._send_file("/".join(rest[1:]), headers={"X-Robots-Tag": unquote(rest[0])})

    def route_goto(self, rest, query):
        self._redirect(query["url"])

    def route_flaky(self, rest, query):
        failures, code, name = int(rest[0]), int(rest[1]), "/".join(rest[2:])
        if self.server.hits[urlsplit(self.path).path] <= failures:
            headers = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
            return self._send_status(code, headers)
        self._send_file(name)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


_ROUTES = {
    "status": _Handler.route_status,
    "sleep": _Handler.route_sleep,
    "drip": _Handler.route_drip,
    "redirect-loop": _Handler.route_redirect_loop,
    "redirect": _Handler.route_redirect,
    "robots": _Handler.route_robots,
    "flaky": _Handler.route_flaky,
    "goto": _Handler.route_goto,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, root: Path, port: int):
        self.root = Path(root).resolve()
        self.hits: Counter[str] = Counter()
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", port), _Handler)


class LocalImageServer:
    """Start with `with LocalImageServer(root) as server:`; `server.url("a.jpg")`."""

    def __init__(self, root: str | Path, port: int = 0):
        self._server = _Server(Path(root), port)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def hits(self) -> Counter[str]:
        return self._server.hits

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def start(self) -> LocalImageServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.download.local_server")
    parser.add_argument("root", help="directory of files to serve")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    with LocalImageServer(args.root, args.port) as server:
        print(f"serving {args.root} at {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
