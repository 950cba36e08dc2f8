"""What dedup reads from a run directory: the completed score shards and, per shard k,

- `download/k.parquet`: `download_sha256` of each image's original bytes (exact dedup);
- `download/k.tar`: the original images, hashed with pHash (and described by their colour
  layout) when no pHash column exists (decoded in JPEG draft mode at about 64 px, so a hash
  costs ~1 ms, not a full decode);
- `select/k.parquet`: only samples that select kept (`select_kept`) take part.

Which files those are, and their checksums, come from the stages' manifests
(`RunLineage`): dedup's up-to-date check compares those recorded checksums and re-hashes
nothing. A select that ran but lacks a score shard's table is an error, not "everyone kept".
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from dedup.config import DedupConfig
from dedup.perceptual import signature_or_none
from pipeline.core.command import InputError
from pipeline.core.decode import original_image_key
from pipeline.core.lineage import recorded_outputs


@dataclass
class RunLineage:
    """The files of a run that dedup reads, by score shard, with their recorded checksums."""

    score_tables: list[Path]  # score/k.parquet of every completed score shard, in shard order
    download_tables: list[Path]
    download_tars: list[Path]
    select_tables: list[Path] | None  # None: no select stage ran; everyone takes part
    inputs: dict[str, str] = field(default_factory=dict)  # "stage/file" -> recorded sha256


def run_lineage(run_dir: Path) -> RunLineage:
    """Score k, download k (table and tar) and select k for every completed score shard k."""
    run_dir = Path(run_dir)
    recorded = {
        stage: recorded_outputs(run_dir / stage) for stage in ("score", "download", "select")
    }
    if recorded["score"] is None:
        raise InputError(
            f"no completed score shards in {run_dir / 'score'}: run `rectiflow score` first"
        )
    shards = sorted(n[: -len(".parquet")] for n in recorded["score"] if n.endswith(".parquet"))
    lineage = RunLineage([], [], [], None if recorded["select"] is None else [])
    missing: dict[str, list[str]] = {}
    for shard in shards:
        wanted = {"score": [f"{shard}.parquet"], "download": [f"{shard}.parquet", f"{shard}.tar"]}
        if lineage.select_tables is not None:
            wanted["select"] = [f"{shard}.parquet"]
        for stage, names in wanted.items():
            for name in names:
                if name not in (recorded[stage] or {}):
                    missing.setdefault(stage, []).append(shard)
                    continue
                lineage.inputs[f"{stage}/{name}"] = recorded[stage][name]
        lineage.score_tables.append(run_dir / "score" / f"{shard}.parquet")
        lineage.download_tables.append(run_dir / "download" / f"{shard}.parquet")
        lineage.download_tars.append(run_dir / "download" / f"{shard}.tar")
        if lineage.select_tables is not None:
            lineage.select_tables.append(run_dir / "select" / f"{shard}.parquet")
    if missing:
        what = "; ".join(
            f"{stage} has no table for {len(set(ids))} score shard(s) "
            f"({', '.join(sorted(set(ids))[:5])})"
            for stage, ids in sorted(missing.items())
        )
        raise InputError(
            f"dedup of {run_dir} is not ready: {what}. Finish those stages for "
            "every score shard first"
        )
    return lineage


@dataclass
class RunSources:
    sha256: dict[str, str] = field(default_factory=dict)  # uid -> hex digest
    phash: dict[str, int] = field(default_factory=dict)  # uid -> signed 64-bit pHash
    colour: dict[str, np.ndarray] = field(default_factory=dict)  # uid -> colour descriptor
    selected: set[str] | None = None  # None: no select stage ran; everyone takes part


def read_run_sources(
    lineage: RunLineage, config: DedupConfig, uids: set[str] | None = None
) -> RunSources:
    """Hashes and the selection for the samples of a run (`uids`: only these)."""
    sources = RunSources()
    if config.exact:
        for path in lineage.download_tables:
            table = pq.read_table(path, columns=["uid", config.sha256_column])
            for uid, digest in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                   strict=True):  # fmt: skip
                if digest and (uids is None or uid in uids):
                    sources.sha256[uid] = digest
    if config.perceptual:
        for tar in tqdm(lineage.download_tars, desc="phash"):
            for uid, (code, colour) in tar_signatures(tar, uids).items():
                sources.phash[uid] = code
                if config.colour_check and colour is not None:
                    sources.colour[uid] = colour
    if lineage.select_tables is not None:
        sources.selected = set()
        for path in lineage.select_tables:
            table = pq.read_table(path, columns=["uid", "select_kept"])
            selected = table.filter(pc.fill_null(table.column("select_kept"), False))
            sources.selected.update(selected.column("uid").to_pylist())
    return sources


def tar_signatures(
    path: Path, uids: set[str] | None = None
) -> dict[str, tuple[int, np.ndarray | None]]:
    """(pHash, colour descriptor) of each original image in a WebDataset tar (`<uid>.<ext>`),
    by uid."""
    signatures = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = original_image_key(member.name) if member.isfile() else None
            if key is None:
                continue  # metadata, and the `.resized.jpg` copies
            if uids is not None and key not in uids:
                continue
            signature = signature_or_none(tar.extractfile(member).read())
            if signature is not None:
                signatures[key] = signature
    return signatures
