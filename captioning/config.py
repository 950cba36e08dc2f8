"""The `[caption]` config section: which VLM, which prompt, how to generate and clean."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from captioning.cleaning import CleaningConfig
from pipeline.core.runners import RunnerConfig


@dataclass
class GenerationParams:
    """`generate` arguments that change the text: recorded with every caption."""

    max_new_tokens: int = 160
    do_sample: bool = False  # greedy by default: reruns give the same captions
    temperature: float = 0.7  # sampling only
    top_p: float = 0.9  # sampling only
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0  # sampling: torch seed set before each batch

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
        return kwargs

    def to_json(self) -> str:
        """What goes in `caption_generation`: only the parameters that were in effect."""
        data = self.generate_kwargs() | ({"seed": self.seed} if self.do_sample else {})
        return json.dumps(data, sort_keys=True)


@dataclass
class CaptionConfig:
    model: str = ""  # captioner id or local path (AutoModelForImageTextToText + AutoProcessor)
    revision: str | None = None
    prompt_id: str = "detailed_v1"  # a registered prompt (captioning/templates.py)
    prompt_text: str | None = None  # a custom prompt; then prompt_id must be a new id
    batch_size: int = 8
    image_size: int = 448  # images are decoded (JPEG draft) to about this; the processor resizes
    decode_threads: int = 4  # images decode in threads, one batch ahead of the model
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    # Token budget counted with this tokenizer (e.g. "SD3_DIR/tokenizer" for CLIP-L); None:
    # an approximate word count (captioning/cleaning.py).
    budget_tokenizer: str | None = None
    max_pixels: int = 89_478_485
    generation: GenerationParams = field(default_factory=GenerationParams)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def __post_init__(self):
        if min(self.batch_size, self.image_size, self.decode_threads) < 1:
            raise ValueError("batch_size, image_size and decode_threads must be at least 1")
