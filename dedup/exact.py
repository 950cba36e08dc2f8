"""Exact duplicates: identical image bytes, found by sha256."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def exact_labels(digests: Sequence[str | None]) -> np.ndarray:
    """A class label per row: rows with equal digests share one; rows without a digest are alone."""
    digests = list(digests)
    labels = np.empty(len(digests), np.int64)
    seen: dict[str, int] = {}
    for row, digest in enumerate(digests):
        # A missing digest must never match another missing digest: it gets a fresh label.
        labels[row] = seen.setdefault(digest, row) if digest else row
    return labels
