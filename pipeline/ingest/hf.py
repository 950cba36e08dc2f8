"""Hugging Face datasets as an ingest source: a `save_to_disk` folder, local Parquet files or
an imagefolder, or a hub id when the machine is online.

Rows are read without decoding images (`Image(decode=False)` gives the original bytes), and
`load_dataset(..., streaming=True)` so a Parquet or imagefolder source is never loaded whole;
a `save_to_disk` folder is memory-mapped Arrow, read row by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.command import InputError
from pipeline.ingest.sources import NO_IMAGE, Record


def hf_records(path: str, split: str, image_column: str, caption_column: str,
               id_column: str) -> Iterator[Record]:
    dataset = _open(path, split)
    columns = list(dataset.column_names or dataset.features or [])
    if image_column not in columns:
        raise InputError(f"--hf {path}: no image column {image_column!r}; the columns are "
                         f"{columns} (set --ingest.image_column=NAME)")
    if caption_column not in columns:
        raise InputError(f"--hf {path}: no caption column {caption_column!r}; the columns are "
                         f"{columns} (set --ingest.caption_column=NAME)")
    from datasets import Image

    dataset = dataset.cast_column(image_column, Image(decode=False))
    for i, row in enumerate(dataset):
        record = Record(f"{split}:{i}", caption=_text(row.get(caption_column)),
                        given_id=row.get(id_column), extra={"ingest_source": f"{split}:{i}"})
        value = row.get(image_column) or {}
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()  # an imagefolder row refers to its file
        if data is None:
            record.reason, record.error = NO_IMAGE, f"row {i} has no image"
        record.data = data
        yield record


def _text(value) -> str | None:
    return None if value is None else str(value)


def _open(path: str, split: str):
    import datasets

    local = Path(path)
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"--hf {path}: no split {split!r}; the splits are "
                                     f"{list(loaded)} (set --ingest.split=NAME)")
                loaded = loaded[split]
            return loaded
        if local.is_file() and local.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(local), split=split,
                                         streaming=True)
        return datasets.load_dataset(str(local) if local.exists() else path, split=split,
                                     streaming=True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds; all are the user's to fix
        hint = "" if local.exists() else (
            f"; {path} is not a local path, and loading it from the hub needs network access: "
            "point --hf at a local copy (a save_to_disk folder, Parquet files or an imagefolder)")
        raise InputError(f"--hf {path}: cannot open it as a dataset: {e}{hint}") from e
