"""SD3 prompt encoding matches diffusers' StableDiffusion3Pipeline.encode_prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.loading import load_text_encoders
from model.text_encoding import assemble_conditioning, encode_prompts

pytestmark = pytest.mark.timeout(120)

PROMPTS = [
    "a red cat sitting on a blue chair",
    "",  # the unconditional prompt used for classifier-free guidance
    " ".join(["a very long prompt that CLIP must truncate"] * 12),
]


@pytest.fixture(scope="module")
def encoders(tiny_models: Path):
    return load_text_encoders(tiny_models / "sd3")


@pytest.fixture(scope="module")
def pipeline(tiny_models: Path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3")


def _diffusers_conditioning(pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    context, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=77,
    )
    return context, pooled


def test_separate_components_have_sd3_shapes(encoders):
    embeddings = encode_prompts(encoders, PROMPTS, t5_max_length=32)
    batch = len(PROMPTS)
    assert embeddings.clip_l_hidden.shape == (batch, 77, 32)
    assert embeddings.clip_g_hidden.shape == (batch, 77, 32)
    assert embeddings.clip_l_pooled.shape == embeddings.clip_g_pooled.shape == (batch, 32)
    assert embeddings.t5_hidden.shape == (batch, 32, 64)
    assert not torch.allclose(embeddings.clip_l_pooled[0], embeddings.clip_l_pooled[1])
    context, pooled = assemble_conditioning(embeddings)
    assert context.shape == (batch, 77 + 32, 64) and pooled.shape == (batch, 64)
    # Layout: [CLIP-L | CLIP-G] channels on the first 77 tokens, then the T5 tokens.
    torch.testing.assert_close(context[:, :77, :32], embeddings.clip_l_hidden)
    torch.testing.assert_close(context[:, :77, 32:64], embeddings.clip_g_hidden)
    torch.testing.assert_close(context[:, 77:], embeddings.t5_hidden)


def test_conditioning_matches_diffusers_encode_prompt(encoders, pipeline):
    context, pooled = assemble_conditioning(encode_prompts(encoders, PROMPTS, t5_max_length=77))
    expected_context, expected_pooled = _diffusers_conditioning(pipeline, PROMPTS)
    assert context.shape == expected_context.shape == (len(PROMPTS), 154, 64)
    torch.testing.assert_close(context, expected_context, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)


def test_without_t5_zero_fills_like_diffusers(tiny_models: Path, pipeline):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(
        **{**pipeline.components, "text_encoder_3": None, "tokenizer_3": None}
    )
    embeddings = encode_prompts(load_text_encoders(tiny_models / "sd3", load_t5=False), PROMPTS)
    assert embeddings.t5_hidden is None
    with pytest.raises(ValueError, match="t5_width"):
        assemble_conditioning(embeddings)
    context, pooled = assemble_conditioning(
        embeddings, t5_width=pipeline.transformer.config.joint_attention_dim
    )
    expected_context, expected_pooled = _diffusers_conditioning(no_t5, PROMPTS)
    torch.testing.assert_close(context, expected_context, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)
    assert torch.count_nonzero(context[:, 77:]) == 0


def test_shorter_clip_length_keeps_the_kept_positions_and_the_pooled_output(encoders):
    # CLIP attends causally, so encoding at 24 positions must give exactly the first 24
    # states (and the same pooled EOS projection) of the full 77 for prompts that fit.
    prompts = PROMPTS[:2]
    full = encode_prompts(encoders, prompts, t5_max_length=24)
    short = encode_prompts(encoders, prompts, t5_max_length=24, clip_max_length=24)
    assert short.clip_l_hidden.shape == (2, 24, 32) and short.clip_g_hidden.shape == (2, 24, 32)
    torch.testing.assert_close(short.clip_l_hidden, full.clip_l_hidden[:, :24])
    torch.testing.assert_close(short.clip_g_hidden, full.clip_g_hidden[:, :24])
    torch.testing.assert_close(short.clip_l_pooled, full.clip_l_pooled)
    torch.testing.assert_close(short.clip_g_pooled, full.clip_g_pooled)
    context, _ = assemble_conditioning(short, t5_length=24)
    assert context.shape == (2, 24 + 24, 64)


def test_clip_length_beyond_its_positions_is_refused(encoders):
    with pytest.raises(ValueError, match="CLIP has 77 positions"):
        encode_prompts(encoders, PROMPTS[:1], clip_max_length=78)


def test_tiny_t5_tokenizer_keeps_words_whole(encoders):
    # A word-level vocabulary like the real T5's: a short caption is a few pieces per word,
    # not one per character, so a 24-token T5 context holds it.
    caption = "three small blue triangles on the right, on a black background"
    pieces = encoders.tokenizer_t5(caption).input_ids
    assert len(pieces) <= 24, encoders.tokenizer_t5.tokenize(caption)
