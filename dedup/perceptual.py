"""Perceptual duplicates: 64-bit pHash codes within a Hamming radius, searched with faiss.

pHash (the DCT hash of imagehash): the 32x32 greyscale image's 2-D DCT, its 8x8 lowest
frequencies compared with their median. Resizing, recompression and small colour shifts move
few of the 64 bits; different photos differ in about half of them.

pHash is colour-blind: the same layout in another colour (a product photo in ten colours, a
red and a blue circle at one place) hashes alike. A colour-layout descriptor from the same
decode confirms a pHash pair: the 8x8 RGB thumbnail, each channel centred on its mean (a tint
cancels), split into luminance and chroma with the chroma weighted up, unit length (a
brightness or contrast change cancels). A recoloured object changes the chroma and does not.
"""

from __future__ import annotations

import faiss
import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm import tqdm

from dedup.pairs import Pairs
from pipeline.core.decode import ImageRejected, decode_for_model

HASH_SIZE = 8  # 8 x 8 low frequencies -> 64 bits
_DCT_SIZE = 32
COLOUR_GRID = 8  # the colour descriptor's thumbnail side: 8 x 8 x RGB = 192 values
COLOUR_DIM = COLOUR_GRID * COLOUR_GRID * 3
# An orthonormal basis of RGB: luminance (grey) and two chroma axes (red-green, yellow-blue).
_LUMA_CHROMA = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float32)
_LUMA_CHROMA /= np.linalg.norm(_LUMA_CHROMA, axis=1, keepdims=True)
# pHash already compared the grey layout; the chroma is what it missed. With the chroma
# weighted 3x, same-layout shapes in another colour score at most 0.83 while copies (resized,
# recompressed, tinted, white-balanced) score 0.87-1.0 (DedupConfig.colour_min_similarity).
# Equal weights (plain RGB) leave a recoloured shape on a white background at up to 0.93, and
# standardising each channel by its own spread makes every colour on white or black alike
# (0.99): the object is then one mask pattern in every channel, whatever its colour.
_CHROMA_WEIGHT = 3.0
# Below this RMS contrast (grey levels) a thumbnail is flat: it has no layout to compare, and
# scaling it to unit length would turn compression noise into a random descriptor.
_MIN_CONTRAST = 2.0


def phash(image: Image.Image) -> int:
    """The 64-bit pHash of an image, as a signed int64 (Parquet has no uint64 in every reader)."""
    grey = image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = dctn(pixels, type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0].astype(np.uint64).view(np.int64))


def colour_layout(image: Image.Image) -> np.ndarray | None:
    """The (192,) float16 unit colour-layout descriptor of an image; None for a flat image.

    The cosine of two descriptors is near 1 for copies and tint or brightness changes, and
    falls when an object's colour changes while the layout stays."""
    thumb = image.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX)
    pixels = np.asarray(thumb, np.float32)
    centred = pixels - pixels.mean(axis=(0, 1))  # a global tint cancels
    if np.sqrt(np.mean(centred**2)) < _MIN_CONTRAST:
        return None
    luma_chroma = centred @ _LUMA_CHROMA.T
    luma_chroma[..., 1:] *= _CHROMA_WEIGHT
    values = luma_chroma.ravel()
    return (values / np.linalg.norm(values)).astype(np.float16)


def perceptual_signature(data: bytes) -> tuple[int, np.ndarray | None]:
    """pHash and colour-layout descriptor of encoded image bytes, from one decode of the
    upright image (JPEG draft mode at about the size needed); raises ImageRejected."""
    image = decode_for_model(data, _DCT_SIZE * 2).image  # JPEG: decoded at 1/2..1/8 scale
    return phash(image), colour_layout(image)


def signature_or_none(data: bytes | None) -> tuple[int, np.ndarray | None] | None:
    """`perceptual_signature`, or None when the bytes do not decode (any ImageRejected reason:
    truncated, not an image, a decompression bomb): such an image takes no part in perceptual
    dedup; why it failed is the score stage's to record, from the same decode module."""
    if not data:
        return None
    try:
        return perceptual_signature(data)
    except ImageRejected:
        return None


def colour_confirmed(
    pairs: Pairs,
    colour: np.ndarray,
    has_colour: np.ndarray,
    min_similarity: float,
    chunk_pairs: int = 65536,
) -> Pairs:
    """The pHash pairs whose colour layouts agree (cosine >= min_similarity).

    A pair where either row has no descriptor stays: without one, pHash alone decides.
    Descriptors are gathered `chunk_pairs` at a time (a dense pHash cluster can have
    millions of pairs; gathering all at once would cost 1.5 KB per pair)."""
    keep = np.ones(len(pairs), bool)
    for start in range(0, len(pairs), chunk_pairs):
        i, j = pairs.i[start : start + chunk_pairs], pairs.j[start : start + chunk_pairs]
        both = has_colour[i] & has_colour[j]
        similar = colour_similarity(colour[i], colour[j]) >= min_similarity
        keep[start : start + chunk_pairs] = ~both | similar
    return pairs.where(keep)


def colour_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two stacks of colour-layout descriptors, (P, 192) -> (P,)."""
    return np.einsum("ij,ij->i", a.astype(np.float32), b.astype(np.float32))


def hamming(a: int, b: int) -> int:
    """Differing bits of two codes (as stored: signed int64)."""
    return bin((int(a) ^ int(b)) & 0xFFFF_FFFF_FFFF_FFFF).count("1")


def phash_pairs(
    codes: np.ndarray, max_distance: int, index_kind: str = "flat", chunk_rows: int = 65536
) -> Pairs:
    """All pairs of codes within `max_distance` bits; similarity = 1 - distance / 64.

    "flat" compares every pair (exact, n^2 popcounts: about 5 min for 1M codes on 2 cores);
    "multihash" looks codes up in 4 tables of 16 bits, flipping up to max_distance // 4 bits,
    which by pigeonhole still finds every pair within the radius, for large n.
    """
    codes = np.ascontiguousarray(np.asarray(codes, np.int64)).view(np.uint8).reshape(-1, 8)
    if len(codes) < 2:
        return Pairs.empty()
    index = _binary_index(index_kind, max_distance)
    index.add(codes)
    parts = []
    for start in tqdm(range(0, len(codes), chunk_rows), desc="phash search", leave=False):
        queries = codes[start : start + chunk_rows]
        # faiss binary range search returns distances strictly below the radius.
        lims, dist, ids = index.range_search(queries, max_distance + 1)
        rows = start + np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
        parts.append(Pairs.from_directed(rows, ids, 1.0 - dist.astype(np.float32) / 64.0))
    return Pairs.concat(parts)


def _binary_index(kind: str, max_distance: int) -> faiss.IndexBinary:
    if kind == "flat":
        return faiss.IndexBinaryFlat(64)
    if kind == "multihash":
        index = faiss.IndexBinaryMultiHash(64, 4, 16)
        index.nflip = max_distance // 4
        return index
    raise ValueError(f"unknown pHash index {kind!r}; allowed: 'flat', 'multihash'")
