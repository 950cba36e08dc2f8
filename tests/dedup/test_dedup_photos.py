"""Planted near-duplicates of real photos (scikit-image's sample images) are grouped with
their original by pHash (confirmed by its colour check) and by an image descriptor; distinct
photos are not."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance

from dedup.config import DedupConfig
from dedup.pairs import Pairs
from dedup.perceptual import (
    COLOUR_DIM,
    colour_confirmed,
    colour_similarity,
    hamming,
    perceptual_signature,
    phash,
    phash_pairs,
)
from dedup.representatives import group_roots, priority_rank, resolve_pairs
from dedup.semantic import SemanticDeduplicator

pytestmark = pytest.mark.timeout(60)

# Distinct photos (skimage's `cat` is `chelsea` again, so it is left out).
PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "moon",
          "hubble_deep_field", "immunohistochemistry", "clock", "cell", "page"]  # fmt: skip
EDITS = ["resized", "recompressed", "cropped", "colour_shifted"]


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def edited(image: Image.Image, edit: str) -> Image.Image:
    w, h = image.size
    if edit == "resized":
        return image.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.BILINEAR)
    if edit == "recompressed":
        return Image.open(io.BytesIO(jpeg(image, quality=25)))
    if edit == "cropped":  # 2.5% off each side
        return image.crop((w // 40, h // 40, w - w // 40, h - h // 40))
    if edit == "colour_shifted":
        warmer = Image.merge(
            "RGB",
            [
                c.point(lambda v, s=s: min(255, v + s))
                for c, s in zip(image.split(), (18, 6, -8), strict=True)
            ],
        )
        return ImageEnhance.Brightness(warmer).enhance(1.1)
    raise ValueError(edit)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def descriptor(image: Image.Image) -> np.ndarray:
    """A small real image descriptor: 8x8 colour thumbnail, per-channel standardised, unit
    length. Brightness and tint shifts cancel out; layout and colour structure remain."""
    thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float32)
    thumb = (thumb - thumb.mean(axis=(0, 1))) / (thumb.std(axis=(0, 1)) + 1e-6)
    return (thumb.ravel() / np.linalg.norm(thumb)).astype(np.float32)


def photo_set():
    """Originals followed by their edited copies: (images, origin index of each image)."""
    originals = [photo(name) for name in PHOTOS]
    images, origin = list(originals), list(range(len(originals)))
    for k, image in enumerate(originals):
        for edit in EDITS:
            images.append(edited(image, edit))
            origin.append(k)
    return images, np.array(origin)


@pytest.fixture(scope="module")
def photos():
    return photo_set()


def edit_of(index: int) -> str | None:
    return None if index < len(PHOTOS) else EDITS[(index - len(PHOTOS)) % len(EDITS)]


def test_phash_is_stable_under_edits_and_differs_between_photos(photos):
    images, origin = photos
    codes = [phash(im) for im in images]
    n = len(PHOTOS)
    # pHash is not crop-invariant (a 2.5% crop moves 2-12 bits): crops are the semantic
    # method's job, so they are left out here and caught in the stage test.
    copies = [i for i in range(n, len(images)) if edit_of(i) != "cropped"]
    copy_distance = max(hamming(codes[origin[i]], codes[i]) for i in copies)
    distinct_distance = min(hamming(codes[a], codes[b]) for a in range(n) for b in range(a))
    assert copy_distance <= DedupConfig.phash_max_distance < distinct_distance


def signatures(encoded: list[bytes]):
    """pHash codes, colour descriptors and their presence, as the dedup step computes them."""
    codes, colours = zip(*(perceptual_signature(data) for data in encoded), strict=True)
    has_colour = np.array([c is not None for c in colours])
    colour = np.stack([np.zeros(COLOUR_DIM, np.float16) if c is None else c for c in colours])
    return np.array(codes), colour, has_colour


def test_phash_of_jpeg_bytes_matches_decoded_image():
    image = photo("astronaut")
    code, colour = perceptual_signature(jpeg(image))
    assert hamming(code, phash(image)) <= 2
    assert colour.shape == (COLOUR_DIM,) and colour.dtype == np.float16


def _grouped_with_origin(pairs: Pairs, origin: np.ndarray) -> np.ndarray:
    decisions = resolve_pairs(pairs, priority_rank(None, len(origin)))
    roots = group_roots(decisions.representative)
    return roots


def test_phash_search_with_colour_check_groups_copies_with_their_original_only(photos):
    images, origin = photos
    keep = [i for i in range(len(images)) if edit_of(i) != "cropped"]
    codes, colour, has_colour = signatures([jpeg(images[i]) for i in keep])
    assert has_colour.all()
    # Resized, recompressed (JPEG 25) and tinted copies keep their colour layout.
    copies = [k for k, i in enumerate(keep) if edit_of(i)]
    originals = [keep.index(origin[keep[k]]) for k in copies]
    similarity = colour_similarity(colour[copies], colour[originals])
    assert similarity.min() >= DedupConfig.colour_min_similarity
    for kind in ("flat", "multihash"):
        pairs = phash_pairs(codes, DedupConfig.phash_max_distance, kind)
        confirmed = colour_confirmed(pairs, colour, has_colour, DedupConfig.colour_min_similarity)
        for found in (pairs, confirmed):
            roots = _grouped_with_origin(found, origin[keep])
            # The original comes first, so "first seen kept" keeps exactly the originals.
            assert np.array_equal(roots, origin[keep]), kind


def test_descriptor_dedup_groups_copies_with_their_original_only(photos):
    images, origin = photos
    vectors = np.stack([descriptor(im) for im in images]).astype(np.float16)
    for mode in ("sd3", "multiprobe"):
        # Copies score 0.87-1.0 with this descriptor, different photos at most 0.64.
        config = DedupConfig(semantic_mode=mode, semantic_threshold=0.8, n_clusters=3)
        pairs = SemanticDeduplicator(config).find_pairs(vectors)
        grouped = _grouped_with_origin(pairs, origin)
        if mode == "multiprobe":
            assert np.array_equal(grouped, origin)
        # Whatever a mode finds is right: never two different photos in one group.
        assert np.array_equal(origin[grouped], origin), mode
