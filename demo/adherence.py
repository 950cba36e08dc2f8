"""Prompt adherence for the shapes world, read from pixels (a GenEval for synthetic scenes).

GenEval runs an object detector over generated images and checks the prompt's objects, counts,
colours and positions. Shapes-world scenes are simple enough that a deterministic pixel
analysis does the same job exactly, with no model to trust:
- background: the median colour of the border ring, named by the nearest background colour;
- objects: pixels with high chroma (objects are saturated, backgrounds are neutral), split
  into connected components, specks dropped;
- colour: the chroma-weighted circular mean hue of object pixels, named by the nearest hue;
- count: the number of components;
- shape: how much of its bounding box the largest component fills, measured softly
  (triangle 1/2, circle pi/4, square 1);
- size: the mean bounding-box side of the components against the world's two sizes;
- position: where the mean of the component centres lies, by the world's own anchors.
It is validated on the world's ground-truth images (tests/demo/test_adherence.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from demo.shapes_world import BACKGROUNDS, PALETTE, SIZES, Scene

ATTRIBUTES = ("colour", "shape", "count", "position", "size", "background")
MIN_CHROMA = 60.0  # objects have chroma >= ~150, jittered backgrounds <= ~16
MIN_SPECK_FRACTION = 0.2  # a component under 20% of the largest is noise, not an object
# Fill ratio thresholds halfway between triangle (0.5), circle (0.785) and square (1.0).
TRIANGLE_CIRCLE_FILL = 0.64
CIRCLE_SQUARE_FILL = 0.89
CENTRE_RADIUS = 0.25  # in half-image units; named positions sit at 0.5 from the centre


@dataclass(frozen=True)
class Detection:
    """What the detector read from one image; `None` where nothing could be read."""

    colour: str | None
    shape: str | None
    count: int
    position: str | None
    size: str | None
    background: str


def detect(image: Image.Image | np.ndarray, colours: Sequence[str] = tuple(PALETTE)) -> Detection:
    """Read a shapes-world scene from an image of any size."""
    rgb = _as_rgb(image)
    background = _nearest_background(np.median(_border(rgb), axis=0))
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    components = _components(chroma >= MIN_CHROMA)
    if not components:
        return Detection(None, None, 0, None, None, background)
    mask = np.zeros(chroma.shape, bool)
    for component in components:
        mask |= component
    return Detection(
        colour=_colour_name(rgb[mask], chroma[mask], colours),
        shape=_shape_name(max(components, key=np.sum), chroma),
        count=len(components),
        position=_position_name(components, rgb.shape[:2]),
        size=_size_name(components, rgb.shape[0]),
        background=background,
    )


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]  # (H, W, 3) in 0..255


def _border(rgb: np.ndarray, width: int = 2) -> np.ndarray:
    ring = np.ones(rgb.shape[:2], bool)
    ring[width:-width, width:-width] = False
    return rgb[ring]  # (N, 3)


def _nearest_background(rgb: np.ndarray) -> str:
    return min(BACKGROUNDS, key=lambda name: float(np.sum((np.array(BACKGROUNDS[name]) - rgb) ** 2)))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components of `mask` as boolean masks, specks removed."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    areas = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    keep = [i + 1 for i, area in enumerate(areas) if area >= MIN_SPECK_FRACTION * areas.max()]
    return [labels == k for k in keep]


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees (0..360) of (..., 3) RGB values."""
    r, g, b = (rgb[..., i] for i in range(3))
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360


def _colour_name(pixels: np.ndarray, weights: np.ndarray, colours: Sequence[str]) -> str:
    angles = np.radians(hue_degrees(pixels))
    mean = np.degrees(np.arctan2(np.sum(weights * np.sin(angles)), np.sum(weights * np.cos(angles))))

    def distance(name: str) -> float:
        reference = float(hue_degrees(np.array(PALETTE[name], np.float32)))
        return abs((mean - reference + 180) % 360 - 180)

    return min(colours, key=distance)


def _bbox(component: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(component)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)  # (h, w)


def _shape_name(component: np.ndarray, chroma: np.ndarray) -> str:
    """Name a component by its soft fill ratio.

    Anti-aliased edges make a binary mask's fill ratio wobble by a pixel's worth on small
    shapes, so coverage is measured softly: chroma is linear in how much of a pixel the object
    covers (backgrounds are neutral), and the soft extents are the per-row and per-column
    maxima of that coverage.
    """
    region = ndimage.binary_dilation(component)  # take in the faint edge pixels too
    peak = np.percentile(chroma[component], 90)
    coverage = np.where(region, np.clip(chroma / max(peak, 1e-6), 0, 1), 0)  # (H, W)
    height, width = coverage.max(axis=1).sum(), coverage.max(axis=0).sum()
    fill = coverage.sum() / max(height * width, 1e-6)
    if fill < TRIANGLE_CIRCLE_FILL:
        return "triangle"
    return "circle" if fill < CIRCLE_SQUARE_FILL else "square"


def _position_name(components: list[np.ndarray], shape: tuple[int, int]) -> str:
    centres = np.array([ndimage.center_of_mass(c) for c in components])  # (N, 2) as (y, x)
    half = np.array(shape, np.float64) / 2
    y, x = (centres.mean(axis=0) + 0.5 - half) / half  # pixel centres sit at index + 0.5
    if max(abs(x), abs(y)) < CENTRE_RADIUS:
        return "centre"
    if abs(x) >= abs(y):
        return "left" if x < 0 else "right"
    return "top" if y < 0 else "bottom"


def _size_name(components: list[np.ndarray], image_side: int) -> str:
    side = np.mean([max(_bbox(c)) for c in components]) / image_side
    return min(SIZES, key=lambda name: abs(SIZES[name] - side))


def truth_of(scene: Scene | dict) -> dict:
    """A scene (or a mapping with its fields or `true_` columns) as a plain attribute dict."""
    if isinstance(scene, Scene):
        return dataclasses.asdict(scene)
    return {a: scene.get(a, scene.get(f"true_{a}")) for a in ATTRIBUTES}


def evaluate_adherence(
    images: Iterable[Image.Image | np.ndarray],
    truths: Iterable[Scene | dict],
    colours: Sequence[str] = tuple(PALETTE),
) -> dict[str, float]:
    """Per-attribute accuracy of images against the scenes their prompts asked for.

    Also reports `all` (every attribute right) and `n`. Attributes missing from a truth
    (None) are not scored for that image.
    """
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    complete: list[bool] = []
    for image, truth in zip(images, truths, strict=True):
        found, wanted = dataclasses.asdict(detect(image, colours)), truth_of(truth)
        scored = [a for a in ATTRIBUTES if wanted.get(a) is not None]
        for attribute in scored:
            hits[attribute].append(found[attribute] == wanted[attribute])
        complete.append(all(found[a] == wanted[a] for a in scored))
    result = {a: float(np.mean(v)) for a, v in hits.items() if v}
    result["all"] = float(np.mean(complete)) if complete else float("nan")
    result["n"] = float(len(complete))
    return result
