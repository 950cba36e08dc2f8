"""What dedup reads from a run directory besides the score tables.

- `download/*.parquet`: `download_sha256` of each image's original bytes (exact dedup);
- `download/*.tar`: the original images, hashed with pHash (and described by their colour
  layout) when no pHash column exists (decoded in JPEG draft mode at about 64 px, so a hash
  costs ~1 ms, not a full decode);
- `select/kept.parquet`: only samples that select kept take part.
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
from pipeline.core.decode import original_image_key


@dataclass
class RunSources:
    sha256: dict[str, str] = field(default_factory=dict)  # uid -> hex digest
    phash: dict[str, int] = field(default_factory=dict)  # uid -> signed 64-bit pHash
    colour: dict[str, np.ndarray] = field(default_factory=dict)  # uid -> colour descriptor
    selected: set[str] | None = None  # None: no select stage ran; everyone takes part
    decision_files: list[Path] = field(default_factory=list)  # inputs whose change redoes dedup


def read_run_sources(
    run_dir: Path, config: DedupConfig, uids: set[str] | None = None
) -> RunSources:
    """Hashes and the selection for the samples of a run (`uids`: only these)."""
    run_dir = Path(run_dir)
    sources = RunSources()
    tables = sorted((run_dir / "download").glob("*.parquet"))
    sources.decision_files += tables
    if config.exact:
        for path in tables:
            table = pq.read_table(path, columns=["uid", config.sha256_column])
            for uid, digest in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                   strict=True):  # fmt: skip
                if digest and (uids is None or uid in uids):
                    sources.sha256[uid] = digest
    if config.perceptual:
        for tar in tqdm(sorted((run_dir / "download").glob("*.tar")), desc="phash"):
            for uid, (code, colour) in tar_signatures(tar, uids).items():
                sources.phash[uid] = code
                if config.colour_check and colour is not None:
                    sources.colour[uid] = colour
    kept = run_dir / "select" / "kept.parquet"
    if kept.exists():
        table = pq.read_table(kept, columns=["uid", "select_kept"])
        selected = table.filter(pc.fill_null(table.column("select_kept"), False))
        sources.selected = set(selected.column("uid").to_pylist())
        sources.decision_files.append(kept)
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
