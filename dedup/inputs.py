"""Dedup's inputs, read from the score stage's Parquet tables into flat arrays.

Only the columns dedup needs are read. Embeddings are copied straight into one float16
array (never the whole set as float32). When a table has no sha256 or pHash column but has
the encoded image bytes, those are computed batch by batch, so images never pile up in memory;
a pHash computed from bytes comes with the image's colour-layout descriptor (the colour check).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dedup.config import DedupConfig
from dedup.exact import sha256_hex
from dedup.perceptual import COLOUR_DIM, signature_or_none
from dedup.run_inputs import RunSources

log = logging.getLogger(__name__)


@dataclass
class DedupInputs:
    files: list[Path]
    file_rows: list[int]  # rows per input file, in order
    uids: np.ndarray  # (N,) object (str)
    active: np.ndarray  # (N,) bool: takes part (keep_column true, or no keep_column)
    sha256: list[str | None] | None
    phash: np.ndarray | None  # (N,) int64
    has_phash: np.ndarray | None  # (N,) bool
    # Colour-layout descriptors confirming pHash pairs; None: no colour check (disabled, or
    # the pHash comes from a column and no image bytes were decoded).
    colour: np.ndarray | None  # (N, 192) float16
    has_colour: np.ndarray | None  # (N,) bool: false for flat images and missing descriptors
    embeddings: np.ndarray | None  # (N, D) float16
    has_embedding: np.ndarray | None  # (N,) bool
    score: np.ndarray | None  # (N,) float64 for choosing representatives; None: input order


def list_inputs(input_dir: Path) -> list[Path]:
    return sorted(p for p in Path(input_dir).glob("*.parquet") if not p.name.startswith("."))


def read_inputs(
    config: DedupConfig, files: list[Path], sources: RunSources | None = None
) -> DedupInputs:
    """Columns of `files`; hashes missing from them come from the run (`sources`)."""
    sources = sources or RunSources()
    schemas = [pq.read_schema(f) for f in files]
    names = set.intersection(*(set(s.names) for s in schemas)) if schemas else set()
    file_rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    n = sum(file_rows)
    uids = np.empty(n, object)
    active = np.ones(n, bool)
    digests: list[str | None] = []
    phashes = np.zeros(n, np.int64)
    has_phash = np.zeros(n, bool)
    colour = has_colour = None
    if _colour_from_bytes(config, names):
        colour, has_colour = np.zeros((n, COLOUR_DIM), np.float16), np.zeros(n, bool)
    embeddings = has_embedding = None
    start = 0
    for path, rows in tqdm(list(zip(files, file_rows, strict=True)), desc="read inputs"):
        table = pq.read_table(path, columns=_wanted_columns(config, names))
        part = slice(start, start + rows)
        file_uids = table.column(config.uid_column).to_pylist()
        uids[part] = np.asarray(file_uids, object)
        if config.keep_column:
            active[part] = table.column(config.keep_column).fill_null(False).to_numpy()
        if sources.selected is not None:
            active[part] &= np.array([u in sources.selected for u in file_uids], bool)
        digests.extend(_digests(config, table, names, file_uids, sources))
        file_phash = _perceptual(config, table, names, file_uids, sources)
        phashes[part], has_phash[part] = file_phash.phash, file_phash.has_phash
        if colour is not None:
            colour[part], has_colour[part] = file_phash.colour, file_phash.has_colour
        if config.semantic and config.embedding_column in names:
            column = table.column(config.embedding_column)
            if embeddings is None:
                dim = _embedding_dim(column)
                embeddings, has_embedding = np.zeros((n, dim), np.float16), np.zeros(n, bool)
            _fill_embeddings(column, embeddings[part], has_embedding[part])
        start += rows
    return DedupInputs(
        files, file_rows, uids, active,
        sha256=digests if config.exact else None,
        phash=phashes if config.perceptual else None,
        has_phash=has_phash if config.perceptual else None,
        colour=colour, has_colour=has_colour,
        embeddings=embeddings, has_embedding=has_embedding,
        score=_representative_score(config, files, names),
    )  # fmt: skip


def _wanted_columns(config: DedupConfig, names: set[str]) -> list[str]:
    wanted = [config.uid_column, config.keep_column]
    if config.exact:
        wanted.append(
            config.sha256_column if config.sha256_column in names else config.image_column
        )
    if config.perceptual:
        wanted.append(config.phash_column if config.phash_column in names else config.image_column)
    if config.semantic:
        wanted.append(config.embedding_column)
    return sorted({c for c in wanted if c and c in names})


def _colour_from_bytes(config: DedupConfig, names: set[str]) -> bool:
    """Whether pHashes are computed from image bytes (the table's or the run's tars), so that
    colour descriptors come with them. A pHash column has no image decoded beside it."""
    return config.perceptual and config.colour_check and config.phash_column not in names


def _digests(config, table: pa.Table, names: set[str], uids: list[str], sources: RunSources):
    """sha256 hex digests for one file: from its column, else from its image bytes, else
    from the run's download tables."""
    if not config.exact:
        return [None] * table.num_rows
    if config.sha256_column in names:
        return table.column(config.sha256_column).to_pylist()
    if config.image_column in names:
        images = table.column(config.image_column)
        return [sha256_hex(b) if b else None for b in _iter_bytes(images)]
    return [sources.sha256.get(uid) for uid in uids]


@dataclass
class _PerceptualPart:
    """pHashes and colour descriptors of one file's rows, with their presence masks."""

    phash: np.ndarray  # (rows,) int64
    has_phash: np.ndarray  # (rows,) bool
    colour: np.ndarray  # (rows, 192) float16
    has_colour: np.ndarray  # (rows,) bool

    @classmethod
    def empty(cls, rows: int) -> _PerceptualPart:
        return cls(np.zeros(rows, np.int64), np.zeros(rows, bool),
                   np.zeros((rows, COLOUR_DIM), np.float16), np.zeros(rows, bool))  # fmt: skip

    def set(self, row: int, code: int, colour: np.ndarray | None) -> None:
        self.phash[row], self.has_phash[row] = code, True
        if colour is not None:
            self.colour[row], self.has_colour[row] = colour, True


def _perceptual(config, table: pa.Table, names: set[str], uids: list[str], sources: RunSources):
    """pHashes (and colour descriptors) for one file: from its pHash column (no descriptors),
    else from its image bytes, else from the run's download tars."""
    part = _PerceptualPart.empty(table.num_rows)
    if not config.perceptual:
        return part
    if config.phash_column in names:
        column = table.column(config.phash_column)
        part.has_phash[:] = column.is_valid().to_numpy(zero_copy_only=False)
        part.phash[:] = column.fill_null(0).cast(pa.int64()).to_numpy()
    elif config.image_column in names:
        for row, data in enumerate(_iter_bytes(table.column(config.image_column))):
            signature = signature_or_none(data)
            if signature is not None:
                part.set(row, *signature)
    else:
        for row, uid in enumerate(uids):
            if uid in sources.phash:
                part.set(row, sources.phash[uid], sources.colour.get(uid))
    return part


def _iter_bytes(column: pa.ChunkedArray):
    for chunk in column.chunks:
        yield from (value.as_py() for value in chunk)


def _embedding_dim(column: pa.ChunkedArray) -> int:
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    lengths = column.combine_chunks().value_lengths().drop_null().to_numpy()
    if len(lengths) == 0:
        raise ValueError("the embedding column has no values")
    return int(lengths[0])


def _fill_embeddings(column: pa.ChunkedArray, out: np.ndarray, present: np.ndarray) -> None:
    row = 0
    for chunk in column.chunks:
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        values = chunk.drop_null().flatten().to_numpy(zero_copy_only=False)
        values = values.astype(np.float16, copy=False).reshape(int(valid.sum()), -1)
        out[row : row + len(chunk)][valid] = values
        present[row : row + len(chunk)] = valid
        row += len(chunk)


def _representative_score(config: DedupConfig, files: list[Path], names: set[str]):
    """The score that picks each group's kept sample (higher is better); None: input order."""
    by = config.representative_by
    columns = {
        "aesthetic": [config.aesthetic_column],
        "clip": [config.clip_column],
        "resolution": [config.width_column, config.height_column],
        "first": [],
    }[by]
    if not columns:
        return None
    if not set(columns) <= names:
        log.warning("representative_by=%s needs columns %s; keeping the first seen", by, columns)
        return None
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
    values = [table.column(c).cast(pa.float64()).fill_null(np.nan).to_numpy() for c in columns]
    return np.prod(values, axis=0)
