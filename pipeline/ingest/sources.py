"""Sources for `rectiflow ingest`: each yields `Record`s in a stable order, one per sample.

A record carries the source's own key (a tar member key, a path relative to the folder, a
dataset row number), its id when the source has one, its caption and its original bytes, or
the reason it cannot be used. Nothing here decodes images (pipeline/core/decode.py does, in
stage.py) and nothing here uses a name from inside an archive as a path on disk: tars are
read as streams (`tarfile` mode "r|*"), a member name is only ever a key.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from pipeline.core import reasons
from pipeline.core.command import InputError
from pipeline.core.storage import list_files, open_file

# Ingest's own reasons (beside pipeline/core/reasons.py's content reasons).
UNSAFE_PATH = "unsafe_path"  # a symlink, or a path that resolves outside the folder
NO_IMAGE = "no_image"  # a sample (tar key, dataset row) with no image member or value
TRUNCATED_TAR = "truncated_tar"  # the tar ends inside a member header or body

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "avif", "bmp", "tif", "tiff")
CAPTION_SIDECARS = ("txt", "caption", "json")


@dataclass
class Record:
    key: str  # where it came from, e.g. "00003.tar:000030007" or "cats/a.jpg"
    caption: str | None = None
    given_id: Any = None  # the source's own id (json uid/key, dataset id column)
    data: bytes | None = None
    reason: str | None = None  # set: the sample is rejected before decoding
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # ingest_* columns


def expand_specs(specs: list[str]) -> list[str]:
    """Brace patterns (`{00000..00099}`) and globs -> the files, sorted, each checked."""
    expanded = [one for spec in specs for one in braceexpand(spec)]
    return list_files(expanded)


# --- WebDataset / img2dataset tars --------------------------------------------------------

def webdataset_records(tars: list[str], caption_field: str, max_bytes: int) -> Iterator[Record]:
    for tar in tars:
        yield from _tar_records(tar, caption_field, max_bytes)


def _tar_records(tar: str, caption_field: str, max_bytes: int) -> Iterator[Record]:
    name = os.path.basename(tar)
    group: dict[str, Any] = {}
    key = None
    with open_file(tar, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as stream:
                for member in stream:
                    if not member.isfile():
                        continue  # directories, links, devices: never samples, never followed
                    member_key, ext = _split_member(member.name)
                    if member_key != key and group:
                        yield _tar_sample(name, key, group, caption_field)
                        group = {}
                    key = member_key
                    if member.size > max_bytes:
                        group[ext] = _TooLarge(member.size)
                        continue
                    group[ext] = stream.extractfile(member).read()
        except (tarfile.ReadError, EOFError, OSError) as e:
            yield Record(f"{name}:{key or ''}", reason=TRUNCATED_TAR, error=f"{tar}: {e}",
                         extra={"ingest_source": name})
            return
    if group:
        yield _tar_sample(name, key, group, caption_field)


@dataclass
class _TooLarge:
    size: int


def _split_member(name: str) -> tuple[str, str]:
    # WebDataset's rule: key = the path up to the first dot of the base name.
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(tar: str, key: str, group: dict[str, Any], caption_field: str) -> Record:
    meta = _json_or_empty(group.get("json"))
    record = Record(f"{tar}:{key}", extra={"ingest_source": tar})
    record.given_id = meta.get("uid") or meta.get("key") or key
    record.caption = _caption(group, meta, caption_field)
    images = [ext for ext in group if ext in IMAGE_EXTENSIONS]
    if not images:
        record.reason, record.error = NO_IMAGE, f"members: {sorted(group)}"
    elif isinstance(group[images[0]], _TooLarge):
        record.reason = reasons.TOO_LARGE
        record.error = f"{group[images[0]].size} bytes"
    else:
        record.data = group[images[0]]
    return record


def _json_or_empty(data: Any) -> dict:
    if not isinstance(data, bytes):
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _caption(sidecars: dict[str, Any], meta: dict, caption_field: str) -> str | None:
    if caption_field:
        value = meta.get(caption_field)
        return None if value is None else str(value)
    for ext in ("txt", "caption"):
        if isinstance(sidecars.get(ext), bytes):
            return sidecars[ext].decode("utf-8", "replace").strip()
    value = meta.get("caption", meta.get("text"))
    return None if value is None else str(value)


# --- image folders ------------------------------------------------------------------------

def folder_records(root: str, caption_field: str, class_folders: bool, class_template: str,
                   max_bytes: int) -> Iterator[Record]:
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"--folder {root} is not a directory")
    real_root = base.resolve()
    found = False
    for path in _walk(base):
        rel = path.relative_to(base).as_posix()
        stem, _, ext = path.name.rpartition(".")
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        found = True
        record = Record(rel, given_id=None, extra={"ingest_source": rel})
        if path.is_symlink() or not path.resolve().is_relative_to(real_root):
            record.reason, record.error = UNSAFE_PATH, f"{path} is a symlink or leaves {root}"
            yield record
            continue
        if class_folders:
            label = rel.split("/")[0] if "/" in rel else ""
            record.caption = class_template.format(**{"class": label.replace("_", " ")})
            record.extra["ingest_class"] = label
        else:
            record.caption = _folder_caption(path.with_name(stem), real_root, caption_field)
        size = path.stat().st_size
        if size > max_bytes:
            record.reason, record.error = reasons.TOO_LARGE, f"{size} bytes"
        else:
            record.data = path.read_bytes()
        yield record
    if not found:
        raise InputError(f"--folder {root} holds no image ({', '.join(IMAGE_EXTENSIONS)})")


def _walk(base: Path) -> Iterator[Path]:
    # Sorted for stable shards; symlinked folders are not entered (followlinks=False).
    for folder, dirs, files in os.walk(base, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _folder_caption(stem: Path, real_root: Path, caption_field: str) -> str | None:
    sidecars: dict[str, Any] = {}
    for ext in CAPTION_SIDECARS:
        side = stem.with_name(f"{stem.name}.{ext}")
        if side.is_file() and not side.is_symlink() and side.resolve().is_relative_to(real_root):
            sidecars[ext] = side.read_bytes()
    return _caption(sidecars, _json_or_empty(sidecars.get("json")), caption_field)
