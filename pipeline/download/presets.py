"""URL list presets: the column names of the public image-text lists (`download.preset`).

A preset names a list's url, caption and id columns, the upstream columns worth carrying
into `download/k.parquet` (where select's `column_min`/`column_max` rules read them), and,
for CC12M, its file format (a headerless TSV). A setting given explicitly in the download
config overrides the preset's.

Passthrough columns of a preset are kept when the list has them: releases of one list differ
(LAION-400M has no `AESTHETIC_SCORE` or `punsafe`; LAION-2B-en has no `AESTHETIC_SCORE` outside
its aesthetic subsets). Columns set explicitly (`download.passthrough_columns`) must be there.
The url column and, unless `download.captions_optional`, the caption column must always be.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListPreset:
    url_column: str
    caption_column: str
    id_column: str
    passthrough: tuple[str, ...] | None  # None: every other column of the list
    input_format: str = "auto"
    column_names: tuple[str, ...] | None = None  # a headerless CSV/TSV's columns


_LAION = ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "WIDTH", "HEIGHT")

PRESETS: dict[str, ListPreset] = {
    # Defaults: the shape rectiflow always took (url, caption, optional id), every column kept.
    "none": ListPreset("url", "caption", "id", None),
    # LAION-400M / LAION-2B(-en, -aesthetic) metadata parquet; no id column is used, so the
    # uid is a hash of url and caption.
    "laion": ListPreset("URL", "TEXT", "id", _LAION),
    # LAION-5B releases (2B-en, 2B-multi, 1B-nolang): SAMPLE_ID is the sample id.
    "laion5b": ListPreset("URL", "TEXT", "SAMPLE_ID", _LAION),
    # DataComp pools (CommonPool, DataComp-1B): `uid` (32 hex digits) is the sample id.
    "datacomp": ListPreset("url", "text", "uid", (
        "original_width", "original_height", "clip_b32_similarity_score",
        "clip_l14_similarity_score", "face_bboxes", "sha256")),
    # COYO-700M parquet.
    "coyo": ListPreset("url", "text", "id", (
        "width", "height", "image_phash", "clip_similarity_vitb32", "clip_similarity_vitl14",
        "nsfw_score_opennsfw2", "nsfw_score_gantman", "watermark_score",
        "aesthetic_score_laion_v2")),
    # Conceptual 12M: cc12m.tsv, tab-separated url and caption, no header row.
    "cc12m": ListPreset("url", "caption", "id", (), input_format="tsv",
                        column_names=("url", "caption")),
}
