"""The HTML report: structure from the renderer, and the page as headless Chromium shows it.

Chromium is whatever `find_chromium` finds (`.ci/run` apt-installs Debian's `chromium`; the
browser tests skip, saying so, where there is none). The page is driven over the DevTools protocol with a small client on
websocket-client: load the report from file://, then ask the browser itself whether every
image decoded, what went to the console and what was fetched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from demo.report import (
    SECTIONS,
    CaptionExample,
    CheckpointRow,
    DuplicateMember,
    FunnelStage,
    ReportData,
    Sample,
    render_report,
)
from demo.report_assets import display_size

HOSTILE = '<script>alert("x")</script> & "quotes"'  # must reach the page as text only


def shape_image(colour: str, size: int = 32, fmt: str = "PNG", background: str = "white") -> bytes:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), colour)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def full_report_data() -> ReportData:
    duplicate_groups = [
        [DuplicateMember("u000", shape_image("red"), "kept"),
         DuplicateMember("u001", shape_image("red", fmt="JPEG"), "near_duplicate 0.97")],
        [DuplicateMember("u010", shape_image("blue", 300), "kept"),  # larger than a thumbnail
         DuplicateMember("u011", b"\x89PNG truncated", "exact_duplicate")],  # undecodable
    ]
    return ReportData(
        title=f"Demo report {HOSTILE}",
        created="2026-01-01T00:00:00Z",
        run_dir="/tmp/run",
        funnel=[FunnelStage("download", 120, 100, {"http_404": 15, "decode_error": 5}),
                FunnelStage("select", 100, 80, {"clip_score_low": 20}),
                FunnelStage("dedup", 80, 73, {"near_duplicate": 7})],
        histograms={"score_clip": [0.1 * (i % 7) for i in range(80)] + [float("nan")],
                    "score_aesthetic": [4.0 + 0.05 * i for i in range(80)],
                    "score_nsfw": []},
        duplicate_groups=duplicate_groups,
        caption_examples=[CaptionExample("u020", shape_image("green"), "img_0042.jpg",
                                         f"a green circle {HOSTILE}")],
        loss_curve=[(step, 1.5 / (1 + 0.01 * step) + 0.05 * (step % 7))
                    for step in range(0, 300, 3)],
        val_curve=[(0, 1.6), (100, 1.1), (200, 0.9), (299, 0.85)],
        sample_grid=[*(Sample(f"a {c} circle", shape_image(c, 16), note=f"detected: {c} circle")
                       for c in ("red", "green", "blue", "yellow")),
                     Sample(HOSTILE, shape_image("red"))],
        baseline_samples=[Sample(f"a {c} circle", shape_image("grey", 16), note="detected: nothing")
                          for c in ("red", "green", "blue", "yellow")],
        adherence={"untrained": {"colour": 0.2, "shape": 0.34},
                   "trained": {"colour": 0.85, "shape": 0.6}},
        adherence_chance={"colour": 1 / 6, "shape": 1 / 3},
        checkpoints=[CheckpointRow(100, 1.1, {"colour": 0.4, "shape": 0.35}),
                     CheckpointRow(200, 0.9, {"colour": 0.7, "shape": 0.5}),
                     CheckpointRow(299, 0.85, {"colour": 0.85, "shape": 0.6})],
        facts=[("autoencoder PSNR", "31.2 dB"), ("wall time", "12 min")],
        notes=["the captioner is a random tiny model", HOSTILE],
    )


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.section_ids: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "section":
            self.section_ids.append(attributes.get("id"))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.mark.timeout(60)
def test_report_structure_and_assets(tmp_path):
    path = render_report(full_report_data(), tmp_path / "out")
    page = parse(path)
    assert path == tmp_path / "out" / "report.html"
    assert page.section_ids == [sid for sid, _, _ in SECTIONS]
    # 2 histograms (the empty one is a note), loss curve, 3 decodable duplicates, 1 caption,
    # 5 trained and 4 baseline samples
    assert len(page.images) == 2 + 1 + 3 + 1 + 5 + 4
    for image in page.images:
        src = image["src"]
        assert not src.startswith(("/", "http", "data:")), src  # relative, next to the page
        with Image.open(path.parent / src) as on_disk:
            assert on_disk.format == "PNG" and on_disk.width > 0
        assert int(image["width"]) > 0 and int(image["height"]) > 0
    tiny = [i for i in page.images if "px" in (i.get("class") or "")]
    assert tiny and all(int(i["width"]) >= 96 for i in tiny)  # 16-32 px images upscaled
    source = path.read_text(encoding="utf-8")
    assert page.scripts == 0 and "<script>" not in source
    text = "".join(page.text)
    assert HOSTILE in text  # shown as text after escaping, in title, notes, caption and prompt
    assert "undecodable image" in text and "No score_nsfw values recorded" in text
    assert "73 of 120 input rows (60.8%)" in text
    assert "score_clip: 80 values, 1 missing" in text  # NaN scores are counted, not plotted
    assert "http://" not in source and "https://" not in source  # nothing external to fetch


@pytest.mark.timeout(60)
def test_checkpoint_correlation_and_adherence_table(tmp_path):
    text = "".join(parse(render_report(full_report_data(), tmp_path)).text)
    # val loss fell while both accuracies rose at every checkpoint: a perfect negative rank order
    assert text.count("-1.00") == 2
    assert "85.0%" in text and "16.7%" in text  # trained colour accuracy, colour chance


@pytest.mark.timeout(60)
def test_empty_report_still_has_every_section(tmp_path):
    path = render_report(ReportData("empty", "now", "/nowhere"), tmp_path)
    page = parse(path)
    assert page.section_ids == [sid for sid, _, _ in SECTIONS]
    assert not page.images
    assert "".join(page.text).count("recorded for this run") == len(SECTIONS)


@pytest.mark.timeout(60)
def test_plain_tuples_and_stage_counts_render_like_records(tmp_path):
    from collections import Counter

    from pipeline.inspect.funnel import StageCount

    png = shape_image("red", 8)
    records = ReportData(
        "t", "now", "/run",
        funnel=[FunnelStage("download", 10, 8, {"http_404": 2})],
        duplicate_groups=[[DuplicateMember("u1", png, "kept")]],
        caption_examples=[CaptionExample("u2", png, "alt", "synthetic")],
        sample_grid=[Sample("a red circle", png)],
        checkpoints=[CheckpointRow(1, 1.0, {"colour": 0.5})])
    tuples = ReportData(
        "t", "now", "/run",
        funnel=[("download", 10, 8, {"http_404": 2})],
        duplicate_groups=[[("u1", png, "kept")]],
        caption_examples=[("u2", png, "alt", "synthetic")],
        sample_grid=[("a red circle", png)],
        checkpoints=[(1, 1.0, {"colour": 0.5})])
    stage_count = StageCount("download", 10, 8, Counter(http_404=2))
    counted = ReportData("t", "now", "/run", funnel=[stage_count])
    expected = render_report(records, tmp_path / "records").read_text()
    assert render_report(tuples, tmp_path / "tuples").read_text() == expected
    funnel_only = ReportData("t", "now", "/run", funnel=records.funnel)
    funnel_only = render_report(funnel_only, tmp_path / "funnel")
    assert render_report(counted, tmp_path / "counted").read_text() == funnel_only.read_text()


def test_display_size_keeps_whole_pixels_and_shrinks_large_images():
    assert display_size(16, 16, 128) == (128, 128, True)
    assert display_size(30, 20, 128) == (120, 80, True)  # factor 4, not a blurry 4.27
    assert display_size(512, 256, 128) == (128, 64, False)
    assert display_size(128, 100, 128) == (128, 100, False)


# --- headless Chromium over the DevTools protocol -------------------------------------------

# Looked for in this order; $CHROMIUM names another binary. The suite never installs it:
# `.ci/run` apt-installs Debian's `chromium` where apt is available.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    """A Chromium binary, or skip (fail with RECTIFLOW_REQUIRE_BROWSER set) saying how to get one."""
    named = os.environ.get("CHROMIUM")
    found = next(filter(None, map(shutil.which, (named,) if named else CHROMIUM_NAMES)), None)
    if found:
        return found
    message = (f"no Chromium binary ({'$CHROMIUM=' + named + ', ' if named else ''}"
               f"{', '.join(CHROMIUM_NAMES)} on PATH): install one (`apt-get install chromium`; "
               "`.ci/run` does) or set $CHROMIUM to run the browser tests")
    if os.environ.get("RECTIFLOW_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


class DevTools:
    """A minimal DevTools-protocol client: one page session, events kept in order."""

    def __init__(self, browser_url: str):
        import websocket  # websocket-client (dev extra)

        # Chromium refuses websocket handshakes carrying an Origin it was not told to allow.
        self.socket = websocket.create_connection(browser_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.session: str | None = None
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            self.events.append(json.loads(self.socket.recv()))
        raise TimeoutError(method)

    def open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1200, height=900,
                  deviceScaleFactor=1, mobile=False)

    def load(self, path: Path) -> PageVisit:
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        return PageVisit(self)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, out: Path) -> Path:
        import base64

        height = self.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
        self.call("Emulation.setDeviceMetricsOverride", width=1200, height=min(int(height), 8000),
                  deviceScaleFactor=1, mobile=False)
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return out


class PageVisit:
    """What one page load left behind: console errors, exceptions, requests, failed loads."""

    def __init__(self, tools: DevTools):
        events = tools.events
        self.errors = [e["params"] for e in events if is_error(e)]
        self.requests = [e["params"]["request"]["url"] for e in events
                         if e.get("method") == "Network.requestWillBeSent"]
        self.failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]


def is_error(event: dict) -> bool:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled":
        return params["type"] in ("error", "assert")
    if method == "Log.entryAdded":
        return params["entry"]["level"] == "error"
    return method == "Runtime.exceptionThrown"


ALL_IMAGES_RENDERED = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    profile = tmp_path_factory.mktemp("chromium_profile")
    process = subprocess.Popen(
        [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        tools = DevTools(devtools_url(profile, process))
        tools.open_page()
        yield tools
        tools.socket.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the browser and the helpers it started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def devtools_url(profile: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """Chromium writes the port it picked and the browser's path to DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = marker.read_text().split() if marker.exists() else []
        if len(lines) >= 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}")
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


@pytest.mark.timeout(300)
def test_report_renders_in_chromium(browser, tmp_path):
    path = render_report(full_report_data(), tmp_path / "out")
    visit = browser.load(path)
    assert browser.evaluate("document.images.length") == len(parse(path).images)
    assert browser.evaluate(ALL_IMAGES_RENDERED) is True
    assert visit.errors == [] and visit.failed == []
    assert path.resolve().as_uri() in visit.requests  # the log saw the page load...
    assert all(url.startswith(("file://", "data:")) for url in visit.requests)  # ...and no more
    assert browser.evaluate("document.scripts.length") == 0
    assert browser.evaluate("document.title").startswith("Demo report <script>")
    shot = browser.screenshot(tmp_path / "report.png")
    with Image.open(shot) as screenshot:
        assert screenshot.width == 1200 and screenshot.height > 900  # the whole, long page


@pytest.mark.timeout(300)
def test_report_policy_blocks_remote_fetches(browser, tmp_path):
    """The page's Content-Security-Policy stops a remote image before it is fetched."""
    path = render_report(ReportData("policy", "now", "/run"), tmp_path)
    remote = "http://127.0.0.1:9/remote.png"  # loopback, and nothing listens there anyway
    path.write_text(path.read_text().replace("</main>", f'<img src="{remote}"></main>'))
    visit = browser.load(path)
    # DevTools announces the request, then reports it blocked by the policy, never sent
    assert [f.get("blockedReason") for f in visit.failed] == ["csp"]
    assert any("Content Security Policy" in json.dumps(e) for e in visit.errors)


@pytest.mark.timeout(300)
def test_browser_check_sees_broken_images_and_console_errors(browser, tmp_path):
    """The checks above can fail: a page with a missing image and a console error trips them."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png">'
                    '<img src="http://127.0.0.1:9/remote.png">'  # loopback; nothing listens
                    '<script>console.error("boom"); throw new Error("thrown")</script>'
                    '</body></html>')
    visit = browser.load(page)
    assert browser.evaluate(ALL_IMAGES_RENDERED) is False
    assert any(e.get("type") == "error" for e in visit.errors)  # console.error
    assert any("exceptionDetails" in e for e in visit.errors)  # the uncaught throw
    assert len(visit.failed) >= 2  # the missing file and the refused connection
    assert "http://127.0.0.1:9/remote.png" in visit.requests  # a fetch that is not file://
