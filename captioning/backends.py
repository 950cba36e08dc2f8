"""Captioner backends: images in, raw generated text out, with the model's provenance.

`TransformersCaptioner` drives any vision-language model that transformers loads with
AutoModelForImageTextToText + AutoProcessor (LLaVA, Qwen2.5-VL, Idefics, ...): the prompt goes
through the processor's own chat template, a batch is generated in one `generate` call with
left padding, and only the new tokens are decoded.
"""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image

from captioning.config import CaptionConfig
from captioning.templates import PromptTemplate, resolve_prompt
from pipeline.core.devices import resolve_device, resolve_dtype


class Captioner(Protocol):
    model_id: str
    model_revision: str | None

    def caption(self, images: list[Image.Image]) -> list[str]: ...


class TransformersCaptioner:
    def __init__(self, config: CaptionConfig):
        from model.loading import load_captioner

        self.config = config
        self.prompt: PromptTemplate = resolve_prompt(config.prompt_id, config.prompt_text)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.processor = load_captioner(config.model, config.revision, self.dtype)
        self.model.to(self.device)
        self.model_id = config.model
        # A hub download knows its commit; a local folder has no revision unless configured.
        self.model_revision = config.revision or getattr(self.model.config, "_commit_hash", None)
        self._prompt_text = self._chat_prompt()

    def _chat_prompt(self) -> str:
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self.prompt.text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch, on the model's device (pixels in its dtype)."""
        batch = self.processor(
            images=images, text=[self._prompt_text] * len(images), return_tensors="pt",
            padding=True,
        )
        out = {}
        for key, value in batch.items():
            value = value.to(self.device)
            out[key] = value.to(self.dtype) if value.is_floating_point() else value
        return out

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        params = self.config.generation
        if params.do_sample:
            torch.manual_seed(params.seed)
        inputs = self.inputs(images)
        output = self.model.generate(**inputs, **params.generate_kwargs())  # (B, L + new)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # left padding: prompts end together
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def token_counter(self):
        """Counts tokens with the configured budget tokenizer (None: the approximate count)."""
        if self.config.budget_tokenizer is None:
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.config.budget_tokenizer)
        return lambda text: len(tokenizer(text, add_special_tokens=True).input_ids)
