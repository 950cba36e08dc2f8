"""SD3 prompt encoding: CLIP-L, CLIP-G and T5, kept apart and assembled like diffusers.

The separate components are what the encode stage stores (each encoder can then be dropped
independently at train time, p = 0.464 in the paper); `assemble_conditioning` turns them into
the (context, pooled) pair the MMDiT consumes, exactly as
`diffusers.StableDiffusion3Pipeline.encode_prompt` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

CLIP_MAX_LENGTH = 77
# The paper and the SD3 training scripts use 77 T5 tokens; diffusers' pipeline defaults to 256.
DEFAULT_T5_MAX_LENGTH = 77


@dataclass
class TextEncoders:
    """The three SD3 text encoders with their tokenizers. `encoder_t5` None means T5 is dropped."""

    tokenizer_l: PreTrainedTokenizerBase
    encoder_l: CLIPTextModelWithProjection
    tokenizer_g: PreTrainedTokenizerBase
    encoder_g: CLIPTextModelWithProjection
    tokenizer_t5: PreTrainedTokenizerBase | None = None
    encoder_t5: PreTrainedModel | None = None

    def to(self, device: torch.device | str) -> TextEncoders:
        for encoder in (self.encoder_l, self.encoder_g, self.encoder_t5):
            if encoder is not None:
                encoder.to(device)
        return self


@dataclass
class PromptEmbeddings:
    """Per-encoder outputs for a batch of B prompts."""

    clip_l_hidden: torch.Tensor  # (B, 77, D_l) penultimate layer (768 for CLIP-L); 77 or less
    clip_l_pooled: torch.Tensor  # (B, P_l) projected text embedding (768)
    clip_g_hidden: torch.Tensor  # (B, 77, D_g) penultimate layer (1280 for bigG)
    clip_g_pooled: torch.Tensor  # (B, P_g) projected text embedding (1280)
    t5_hidden: torch.Tensor | None  # (B, T, D_t5) last layer (4096 for T5-XXL); None without T5


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int
) -> torch.Tensor:
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return tokens.input_ids  # (B, max_length); no attention mask, as SD3 attends to padding


def encode_clip(
    tokenizer: PreTrainedTokenizerBase,
    encoder: CLIPTextModelWithProjection,
    prompts: list[str],
    max_length: int = CLIP_MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states (B, max_length, D), pooled projection (B, P)) of one CLIP.

    CLIP's attention is causal, so a shorter max_length leaves the states of the kept
    positions unchanged: it only drops trailing padding (and truncates longer prompts).
    """
    if not 1 <= max_length <= CLIP_MAX_LENGTH:
        raise ValueError(f"CLIP max_length={max_length}: CLIP has {CLIP_MAX_LENGTH} positions")
    input_ids = _tokenize(tokenizer, prompts, max_length).to(encoder.device)
    output = encoder(input_ids, output_hidden_states=True)
    return output.hidden_states[-2], output.text_embeds


def encode_t5(
    tokenizer: PreTrainedTokenizerBase,
    encoder: PreTrainedModel,
    prompts: list[str],
    max_length: int,
) -> torch.Tensor:
    """Last hidden state (B, max_length, D_t5) of the T5 encoder."""
    input_ids = _tokenize(tokenizer, prompts, max_length).to(encoder.device)
    return encoder(input_ids)[0]


@torch.no_grad()
def encode_prompts(
    encoders: TextEncoders,
    prompts: list[str],
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
    clip_max_length: int = CLIP_MAX_LENGTH,
) -> PromptEmbeddings:
    """Encode a batch of prompts with every loaded encoder (T5 only when loaded)."""
    prompts = list(prompts)
    clip_l_hidden, clip_l_pooled = encode_clip(
        encoders.tokenizer_l, encoders.encoder_l, prompts, clip_max_length
    )
    clip_g_hidden, clip_g_pooled = encode_clip(
        encoders.tokenizer_g, encoders.encoder_g, prompts, clip_max_length
    )
    t5_hidden = None
    if encoders.encoder_t5 is not None:
        t5_hidden = encode_t5(encoders.tokenizer_t5, encoders.encoder_t5, prompts, t5_max_length)
    return PromptEmbeddings(clip_l_hidden, clip_l_pooled, clip_g_hidden, clip_g_pooled, t5_hidden)


def assemble_conditioning(
    embeddings: PromptEmbeddings,
    t5_width: int | None = None,
    t5_length: int = DEFAULT_T5_MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 + T, D_t5), pooled (B, P_l + P_g)) as diffusers' SD3 pipeline builds them.

    (77 is the CLIP length: less when the prompts were encoded with a shorter clip_max_length.)

    Without T5 the T5 block is zeros of (B, t5_length, t5_width), like diffusers does when
    text_encoder_3 is None; t5_width is then the transformer's joint_attention_dim.
    """
    clip_hidden = torch.cat(
        [embeddings.clip_l_hidden, embeddings.clip_g_hidden], dim=-1
    )  # (B, 77, D_l + D_g)
    t5_hidden = embeddings.t5_hidden
    if t5_hidden is None:
        if t5_width is None:
            raise ValueError(
                "t5_width (the transformer's joint_attention_dim) is needed without T5"
            )
        batch = clip_hidden.shape[0]
        t5_hidden = clip_hidden.new_zeros(batch, t5_length, t5_width)  # (B, T, D_t5)
    clip_hidden = F.pad(
        clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1])
    )  # (B, 77, D_t5)
    context = torch.cat([clip_hidden, t5_hidden], dim=-2)  # (B, 77 + T, D_t5)
    pooled = torch.cat(
        [embeddings.clip_l_pooled, embeddings.clip_g_pooled], dim=-1
    )  # (B, P_l + P_g)
    return context, pooled
