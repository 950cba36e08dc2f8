"""Select's configuration: the rules a user sets and the presets that fill in the rest.

Presets: `datacomp_basic` follows DataComp's basic filter (English caption, more than two
words and five characters, smaller side over 200 pixels, aspect ratio under 3). DataComp
detects English with fasttext, which needs a model file we cannot fetch offline; here a
caption counts as English-like when at least 90% of its letters are ASCII, which keeps
other Latin-script languages (documented in docs/queries.md). `datacomp_clip_top30` keeps
the best 30% of the pool by CLIP score (DataComp's "CLIP score (L/14 30%)" baseline).
`laion_aesthetics` is LAION-Aesthetics v2 5+ (`AESTHETIC_SCORE` >= 5, `pwatermark` < 0.8,
`punsafe` < 0.5, on the columns of a LAION list: `download.preset=laion`), and
`laion_aesthetics_6_5` its 6.5+ subset; both are `column_min`/`column_max` rules.

Column rules: `column_min = {NAME = v}` keeps a row when the upstream column NAME >= v,
`column_max = {NAME = v}` when NAME < v (the same sides as aesthetic_min and nsfw_max). NAME is
any numeric column of `download/k.parquet`: a list's passthrough columns live there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

PRESETS: dict[str, dict[str, object]] = {
    "none": {},
    "datacomp_basic": {
        "english_like": True,
        "min_caption_words": 3,  # "more than two words"
        "min_caption_chars": 6,  # "more than five characters"
        "min_side": 201,  # "smaller dimension more than 200 pixels"
        "max_aspect": 3.0,  # "aspect ratio smaller than 3" (either orientation)
    },
    "datacomp_clip_top30": {"clip_top_percent": 30.0},
    "laion_aesthetics": {"column_min": {"AESTHETIC_SCORE": 5.0},
                         "column_max": {"pwatermark": 0.8, "punsafe": 0.5}},
    "laion_aesthetics_6_5": {"column_min": {"AESTHETIC_SCORE": 6.5},
                             "column_max": {"pwatermark": 0.8, "punsafe": 0.5}},
}
_COLUMN_RULES = ("column_min", "column_max")


class SelectError(ValueError):
    """A rule that cannot be applied to these scores."""


@dataclass
class SelectConfig:
    """Unset (None) rules are off; a preset fills only the fields left unset."""

    preset: Literal["none", "datacomp_basic", "datacomp_clip_top30", "laion_aesthetics",
                    "laion_aesthetics_6_5"] = "none"
    nsfw_max: float | None = None  # keep when score_nsfw < nsfw_max
    aesthetic_min: float | None = None  # keep when score_aesthetic >= aesthetic_min
    clip_min: float | None = None  # keep when score_clip >= clip_min (cosine)
    # Keep the best k% of the scored pool by score_clip; the cut is a histogram bin edge, so
    # it may keep up to one bin's rows more than k% (pipeline/select/sketch.py).
    clip_top_percent: float | None = None
    min_side: int | None = None  # keep when min(width, height) >= min_side
    max_aspect: float | None = None  # keep when max(w/h, h/w) < max_aspect
    min_caption_words: int | None = None
    min_caption_chars: int | None = None
    english_like: bool | None = None
    # Upstream column -> threshold (module doc); a preset's entries fill the names left unset.
    column_min: dict[str, float] | None = None  # keep when column >= value
    column_max: dict[str, float] | None = None  # keep when column < value

    def __post_init__(self):
        if self.clip_top_percent is not None and not 0 < self.clip_top_percent <= 100:
            raise ValueError(f"clip_top_percent = {self.clip_top_percent} must be in (0, 100]")

    def resolved(self) -> SelectConfig:
        """This config with the preset's values filled into the fields left unset."""
        unset = {k: v for k, v in PRESETS[self.preset].items()
                 if k not in _COLUMN_RULES and getattr(self, k) is None}
        for k in _COLUMN_RULES:  # merged per column: a user's value for a name wins
            merged = {**PRESETS[self.preset].get(k, {}), **(getattr(self, k) or {})}
            unset[k] = merged or None
        return replace(self, **unset)

    def needs_download(self) -> bool:
        """Whether a rule reads `download/k.parquet` (captions, upstream columns)."""
        c = self.resolved()
        return bool(c.english_like or c.column_min or c.column_max)


def describe(config: SelectConfig) -> list[str]:
    """The resolved, active settings, for printing."""
    resolved = config.resolved()
    return [f"{f.name} = {getattr(resolved, f.name)}" for f in fields(resolved)
            if getattr(resolved, f.name) is not None]
