"""The files next to report.html: image thumbnails and matplotlib charts, written as PNGs.

Files in `assets/` with relative links rather than base64 data URIs keep the HTML small and
readable, and both open from file:// with no server. Charts use matplotlib's `Figure`
directly (the Agg canvas), never pyplot, so rendering touches no global backend state.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.core.decode import ImageRejected, decode_for_model

MAX_STORED_SIDE = 512  # thumbnails never need more; a full-size photo would bloat assets/
CHART_SIZE_INCHES = (4.8, 2.8)
CHART_DPI = 100
BAR_COLOUR = "#3b6ea8"


def display_size(width: int, height: int, target: int) -> tuple[int, int, bool]:
    """On-page size for an image: tiny images grow by a whole factor (so that pixelated
    upscaling keeps square pixels), large ones shrink to `target`. Returns (w, h, upscaled)."""
    longest = max(width, height)
    if longest <= target:
        factor = max(1, target // longest)
        return width * factor, height * factor, factor > 1
    scale = target / longest
    return max(1, round(width * scale)), max(1, round(height * scale)), False


class AssetWriter:
    """Writes the report's PNGs under out_dir/assets and returns the <img> tags that show them."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.assets = out_dir / "assets"
        self.assets.mkdir(parents=True, exist_ok=True)

    def thumbnail(self, name: str, data: bytes, alt: str, target: int = 128) -> str:
        """An <img> for encoded image bytes, or a visible placeholder when they do not decode
        (the web is full of broken files; the report must show that, not crash on it)."""
        image = _decoded_or_none(data)
        if image is None:
            side = f"width:{target}px;height:{target}px"
            return f'<div class="broken" style="{side}">undecodable image</div>'
        image.thumbnail((MAX_STORED_SIDE, MAX_STORED_SIDE))
        path = self.assets / f"{name}.png"
        image.save(path, format="PNG")
        width, height, upscaled = display_size(image.width, image.height, target)
        css = ' class="px"' if upscaled else ""
        return self._img(path, alt, width, height, css)

    def chart(self, name: str, figure: Figure, alt: str) -> str:
        path = self.assets / f"{name}.png"
        figure.savefig(path, format="png", dpi=CHART_DPI)
        saved = decode_for_model(path.read_bytes(), None)  # the PNG as written: its pixel size
        width, height = saved.width, saved.height
        return self._img(path, alt, width, height, "")

    def _img(self, path: Path, alt: str, width: int, height: int, css: str) -> str:
        src = html.escape(path.relative_to(self.out_dir).as_posix())
        return (f'<img src="{src}" alt="{html.escape(alt)}" width="{width}" '
                f'height="{height}"{css} loading="eager">')


def _decoded_or_none(data: bytes) -> Image.Image | None:
    """Upright RGB from the pipeline's own decode module (so the report shows what the stages
    saw), None for bytes it rejects."""
    try:
        return decode_for_model(data, MAX_STORED_SIDE).image
    except ImageRejected:
        return None


def _new_figure() -> tuple[Figure, object]:
    figure = Figure(figsize=CHART_SIZE_INCHES, dpi=CHART_DPI, layout="tight")
    return figure, figure.subplots()


def histogram_figure(name: str, values: Sequence[float]) -> Figure | None:
    """A histogram of the finite values (failed rows carry NaN scores), None when there are none."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    figure, axes = _new_figure()
    axes.hist(finite, bins=min(40, max(5, int(math.sqrt(finite.size)) * 2)), color=BAR_COLOUR)
    axes.axvline(float(np.median(finite)), color="#c0392b", linestyle="--", linewidth=1,
                 label=f"median {np.median(finite):.3g}")
    axes.set_xlabel(name)
    axes.set_ylabel("samples")
    axes.legend(loc="best", fontsize=8, frameon=False)
    return figure


def smoothed(values: np.ndarray) -> np.ndarray:
    """A centred moving average about 1/25 of the run wide: the trend, without the batch noise."""
    window = max(1, len(values) // 25)
    if window < 2:
        return values
    kernel = np.ones(window) / window
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def loss_figure(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]]) -> Figure:
    figure, axes = _new_figure()
    if train:
        steps = np.array([step for step, _ in train], dtype=np.float64)
        losses = np.array([loss for _, loss in train], dtype=np.float64)
        axes.plot(steps, losses, color=BAR_COLOUR, alpha=0.3, linewidth=0.8, label="train")
        axes.plot(steps, smoothed(losses), color=BAR_COLOUR, linewidth=1.6,
                  label="train (smoothed)")
    if val:
        steps, losses = [step for step, _ in val], [loss for _, loss in val]
        axes.plot(steps, losses, "o-", color="#c0392b", markersize=4, label="validation")
    every = [loss for _, loss in (*train, *val) if loss > 0 and math.isfinite(loss)]
    if every and max(every) / min(every) > 20:  # early steps would flatten the rest
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend(loc="best", fontsize=8, frameon=False)
    return figure
