"""Shard manifests and atomic shard outputs: what makes reruns resume and crashes harmless.

A shard's outputs are written under temporary names and renamed into place only when all
of them are complete; the manifest (rows in and out, reasons, input and output checksums,
output sizes, config hash, model ids) is written last. A shard counts as done when its
manifest exists, names the current config hash and input checksums, and its outputs exist
with the recorded sizes; `verify=True` also re-hashes the outputs against the recorded
sha256. Input checksums are the ones the upstream manifests recorded (pipeline/core/
lineage.py), so deciding what is done reads manifests and stats files, never their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.run_lock import run_lock

MANIFEST_SUFFIX = ".manifest.json"

# What a shard read: "stage/file" -> sha256 recorded upstream (pipeline/core/lineage.py), or
# files without a manifest of their own (a stage's raw inputs), hashed when given as paths.
Inputs = Mapping[str, str] | Sequence[Path]


@dataclass
class ShardManifest:
    stage: str
    shard: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> sha256
    outputs: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    rows_in: int = 0
    rows_out: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # drop reason -> count
    seconds: float = 0.0
    models: dict[str, str] = field(default_factory=dict)  # role -> "id@revision"
    # Stage-specific facts a driver merges without reading the shard's tables (e.g. select's
    # per-rule tallies); JSON values only.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> ShardManifest:
        return cls(**json.loads(Path(path).read_text()))


def manifest_path(stage_dir: Path, shard: str) -> Path:
    return Path(stage_dir) / f"{shard}{MANIFEST_SUFFIX}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(paths: Sequence[Path]) -> dict[str, str]:
    return {Path(p).name: sha256_file(Path(p)) for p in paths}


def input_checksums(inputs: Inputs) -> dict[str, str]:
    """Recorded checksums as given; a list of paths (files no manifest vouches for) is hashed."""
    return dict(inputs) if isinstance(inputs, Mapping) else checksums(inputs)


def read_manifest(stage_dir: Path, shard: str) -> ShardManifest | None:
    """The shard's manifest, or None when it is missing or unreadable (the shard is redone)."""
    path = manifest_path(stage_dir, shard)
    try:
        return ShardManifest.read(path)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def completed_manifest(
    stage_dir: Path, shard: str, config_hash: str, inputs: Inputs, verify: bool = False
) -> ShardManifest | None:
    """The shard's manifest if the shard is complete and current, else None (redo it)."""
    manifest = read_manifest(stage_dir, shard)
    if manifest is None or manifest.config_hash != config_hash:
        return None
    if manifest.inputs != input_checksums(inputs):
        return None
    return manifest if outputs_intact(stage_dir, manifest, verify) else None


def outputs_intact(stage_dir: Path, manifest: ShardManifest, verify: bool = False) -> bool:
    """Every output exists with its recorded size (and, with `verify`, its recorded sha256).

    A manifest from before sizes were recorded is checked by sha256, as it was written to be.
    """
    for name, digest in manifest.outputs.items():
        out = Path(stage_dir) / name
        size = manifest.sizes.get(name)
        try:
            if size is not None and out.stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
        if (verify or size is None) and sha256_file(out) != digest:
            return False
    return True


class ShardOutputs:
    """Temporary paths for a shard's output files, renamed into place together on success."""

    def __init__(self, stage_dir: Path):
        self.stage_dir = Path(stage_dir)
        self._pending: dict[Path, Path] = {}

    def path(self, name: str) -> Path:
        final = self.stage_dir / name  # may be in a subfolder, e.g. "shards/00000.tar"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self._pending[final] = tmp
        return tmp

    def commit(self) -> list[Path]:
        for final, tmp in self._pending.items():
            os.replace(tmp, final)
        return list(self._pending)

    def discard(self) -> None:
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)


@contextmanager
def shard_outputs(
    stage_dir: Path, manifest: ShardManifest, inputs: Inputs
) -> Iterator[ShardOutputs]:
    """Write a shard's outputs atomically, then its manifest; on error leave nothing behind.

    The caller fills `manifest` (rows, reasons, models) inside the block. `inputs` are
    recorded as given (see `Inputs`); outputs are hashed once, here, as they are published.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest must not vouch for outputs that are about to change.
    manifest_path(stage_dir, manifest.shard).unlink(missing_ok=True)
    outputs = ShardOutputs(stage_dir)
    start = time.perf_counter()
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    finals = outputs.commit()
    manifest.inputs = input_checksums(inputs)
    names = {p: str(p.relative_to(stage_dir)) for p in finals}
    manifest.outputs = {name: sha256_file(p) for p, name in names.items()}
    manifest.sizes = {name: p.stat().st_size for p, name in names.items()}
    manifest.seconds = round(time.perf_counter() - start, 3)
    write_json_atomic(manifest_path(stage_dir, manifest.shard), asdict(manifest))


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def remove_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Delete half-written outputs of a killed run, holding the run directory's lock.

    The lock (pipeline/core/run_lock.py; re-entrant in one process) is what makes this safe:
    a run still writing these temporaries holds it, so a second run is refused here instead
    of deleting them.
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    with run_lock(stage_dir.parent):
        stale = sorted(stage_dir.rglob(".*.tmp-*"))
        for path in stale:
            path.unlink(missing_ok=True)
    return stale


def manifest_shards(stage_dir: Path) -> list[str]:
    """Names of the shards of a stage folder that have a manifest (were completed), sorted."""
    paths = sorted(Path(stage_dir).glob(f"*{MANIFEST_SUFFIX}"))
    return [p.name[: -len(MANIFEST_SUFFIX)] for p in paths]


def read_manifests(stage_dir: Path) -> list[ShardManifest]:
    return [ShardManifest.read(manifest_path(stage_dir, s)) for s in manifest_shards(stage_dir)]


def stage_stats(stage_dir: Path) -> dict:
    """Per-stage stats merged from the shard manifests: counts, reasons, throughput."""
    manifests = read_manifests(stage_dir)
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m.reasons)
    seconds = sum(m.seconds for m in manifests)
    rows_in = sum(m.rows_in for m in manifests)
    return {
        "shards": len(manifests),
        "rows_in": rows_in,
        "rows_out": sum(m.rows_out for m in manifests),
        "reasons": dict(reasons.most_common()),
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows_in / seconds, 2) if seconds else None,
    }
