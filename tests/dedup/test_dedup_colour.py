"""pHash is colour-blind: the shapes world's same-layout scenes in different colours hash
alike. The colour check of perceptual dedup keeps them apart, while a recompressed or resized
copy of one of them still groups with it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_dedup_photos import signatures

from dedup.config import DedupConfig
from dedup.pairs import Pairs
from dedup.perceptual import colour_confirmed, colour_layout, colour_similarity, phash_pairs
from dedup.representatives import group_roots, priority_rank, resolve_pairs
from demo.shapes_world import Scene, WorldConfig, encode_image, render_scene

pytestmark = pytest.mark.timeout(60)

COLOURS = WorldConfig().colours  # red, yellow, green, cyan, blue, purple
# (shape, size, position, count, background): two layouts on each background
LAYOUTS = [
    ("circle", "large", "left", 1, "white"),
    ("square", "small", "top", 3, "white"),
    ("triangle", "large", "centre", 2, "grey"),
    ("circle", "small", "bottom", 2, "grey"),
    ("square", "large", "right", 1, "black"),
    ("triangle", "small", "left", 3, "black"),
]
COPIES = ("recompressed", "resized")  # of each layout's first colour


def render(layout: int, colour: str) -> Image.Image:
    """Layout `layout` in `colour`: the same seed gives the same positions and jitter."""
    shape, size, position, count, background = LAYOUTS[layout]
    scene = Scene(colour, shape, size, position, count, background)
    return render_scene(scene, 64, np.random.default_rng(layout))


def copy_of(image: Image.Image, kind: str) -> bytes:
    if kind == "recompressed":
        return encode_image(image, "jpg", 60)
    return encode_image(image.resize((96, 96), Image.Resampling.BICUBIC), "png", 0)


def recoloured_scenes():
    """Every layout in every colour (PNG), each followed by its copies when it is the first
    colour: (encoded images, uids, origin: the index of the image each one copies)."""
    encoded, uids, origin = [], [], []
    for layout in range(len(LAYOUTS)):
        for colour in COLOURS:
            image = render(layout, colour)
            own = len(encoded)
            encoded.append(encode_image(image, "png", 0))
            uids.append(f"layout{layout}_{colour}")
            origin.append(own)
            for kind in COPIES if colour == COLOURS[0] else ():
                encoded.append(copy_of(image, kind))
                uids.append(f"layout{layout}_{colour}_{kind}")
                origin.append(own)
    return encoded, uids, np.array(origin)


def roots_of(pairs: Pairs, n: int) -> np.ndarray:
    """Each image's kept image, "first seen kept" (originals come before their copies)."""
    return group_roots(resolve_pairs(pairs, priority_rank(None, n)).representative)


def test_phash_groups_recoloured_shapes_and_the_colour_check_splits_them():
    encoded, _, origin = recoloured_scenes()
    codes, colour, has_colour = signatures(encoded)
    assert has_colour.all()
    pairs = phash_pairs(codes, DedupConfig.phash_max_distance)
    # pHash alone: different colours of one layout land in one group.
    assert not np.array_equal(roots_of(pairs, len(codes)), origin)
    threshold = DedupConfig.colour_min_similarity
    confirmed = colour_confirmed(pairs, colour, has_colour, threshold)
    # With the colour check: each original with its own copies only.
    assert np.array_equal(roots_of(confirmed, len(codes)), origin)
    # ... by a margin: recoloured layouts score at most 0.79, these copies 0.999 and more.
    copies = np.flatnonzero(origin != np.arange(len(origin)))
    assert colour_similarity(colour[copies], colour[origin[copies]]).min() >= threshold + 0.1
    recoloured = [p for p in pairs.as_set() if origin[p[0]] != origin[p[1]]]
    i, j = np.array(recoloured).T
    assert colour_similarity(colour[i], colour[j]).max() <= threshold - 0.03


def test_flat_image_has_no_colour_layout_so_phash_alone_decides():
    flat = [Image.new("RGB", (64, 64), rgb) for rgb in ((220, 40, 40), (40, 70, 220))]
    assert all(colour_layout(image) is None for image in flat)
    encoded = [encode_image(image, "png", 0) for image in flat]
    codes, colour, has_colour = signatures(encoded)
    pairs = phash_pairs(codes, DedupConfig.phash_max_distance)
    assert len(pairs) == 1 and not has_colour.any()
    kept = colour_confirmed(pairs, colour, has_colour, DedupConfig.colour_min_similarity)
    assert kept.as_set() == pairs.as_set()
