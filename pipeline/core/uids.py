"""Stable sample ids: the input's own id when it makes a valid key, else a content hash.

WebDataset splits a file name at its first dot into key and extension, so a uid must never
contain a dot (or a slash); ids that would break that are hashed instead of mangled, so two
different inputs can never collide into one key.
"""

from __future__ import annotations

import hashlib
import re

_VALID_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def uid_for(url: str, caption: str | None, given_id: object = None) -> str:
    """The uid of one input row."""
    if given_id is not None and str(given_id) != "":
        text = str(given_id)
        if _VALID_KEY.match(text):
            return text
        return "id_" + hashlib.sha256(text.encode()).hexdigest()[:24]
    blob = f"{url}\x00{caption or ''}".encode()
    return "h_" + hashlib.sha256(blob).hexdigest()[:24]


def is_valid_uid(uid: str) -> bool:
    return bool(_VALID_KEY.match(uid))


# The uid -> shard index (`download/_uid_index/BB.parquet`, columns uid and shard) is split by
# this bucket, so one lookup reads 1/256 of the run's uids, and duplicate uids across input
# parts meet in one bucket.
UID_INDEX_DIR = "_uid_index"
UID_INDEX_BUCKETS = 256


def uid_bucket(uid: str, buckets: int = UID_INDEX_BUCKETS) -> int:
    """The index bucket of a uid: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") % buckets
