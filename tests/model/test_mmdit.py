"""MMDiT: agreement with diffusers' SD3Transformer2DModel, conversion, presets, FLOPs, compile."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.convert import export_diffusers_transformer, load_diffusers_transformer
from model.flops import mmdit_flops
from model.mmdit import MMDiT, MMDiTConfig

pytestmark = pytest.mark.timeout(120)

TINY = dict(
    sample_size=8, num_layers=3, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=16,
)
TEXT_TOKENS = 7


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (adaLN and output layers included), so agreement means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (param.dim() == 1) * 0.1)


def inputs(batch: int, height: int, width: int, seed: int = 0, joint_dim: int = 64, pooled_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, height, width, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, TEXT_TOKENS, joint_dim, generator=g),
        torch.randn(batch, pooled_dim, generator=g),
    )


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@torch.no_grad()
def diffusers_velocity(model: SD3Transformer2DModel, x, t, context, pooled) -> torch.Tensor:
    return model(x, context, pooled, t * 1000, return_dict=False)[0]  # diffusers embeds 1000 t


@pytest.mark.parametrize(
    "batch, height, width, qk_norm, dual_layers",
    [
        (1, 8, 8, None, ()),  # square, batch 1
        (3, 8, 12, None, ()),  # non-square, batch 3
        (3, 12, 8, "rms_norm", ()),  # QK norm
        (1, 10, 6, "rms_norm", (0, 2)),  # SD3.5 dual attention, also in the pre-only last block
    ],
)
def test_agrees_with_diffusers_after_loading(tmp_path, batch, height, width, qk_norm, dual_layers):
    reference = SD3Transformer2DModel(**TINY, qk_norm=qk_norm, dual_attention_layers=dual_layers).eval()
    randomize(reference, seed=batch + height)
    reference.save_pretrained(tmp_path)
    ours = load_diffusers_transformer(tmp_path).eval()
    x, t, context, pooled = inputs(batch, height, width)
    expected = diffusers_velocity(reference, x, t, context, pooled)
    with torch.no_grad():
        got = ours(x, t, context, pooled)
    assert got.shape == (batch, 16, height, width)
    assert expected.norm() > 1.0  # non-trivial output
    assert relative_error(got, expected) < 1e-5


def test_round_trip_through_diffusers(tmp_path):
    config = MMDiTConfig(**TINY, qk_norm="rms_norm", dual_attention_layers=(1,))
    ours = MMDiT(config).eval()
    randomize(ours, seed=7)
    export_diffusers_transformer(ours, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["_class_name"] == (
        "SD3Transformer2DModel")
    reference = SD3Transformer2DModel.from_pretrained(tmp_path / "export").eval()
    x, t, context, pooled = inputs(3, 8, 12, seed=1)
    with torch.no_grad():
        ours_out = ours(x, t, context, pooled)
    assert relative_error(diffusers_velocity(reference, x, t, context, pooled), ours_out) < 1e-5
    reloaded = load_diffusers_transformer(tmp_path / "export")
    for key, value in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_sharded_export_loads(tmp_path):
    ours = MMDiT(MMDiTConfig(**TINY))
    randomize(ours, seed=3)
    export_diffusers_transformer(ours, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    reloaded = load_diffusers_transformer(tmp_path).state_dict()
    assert reloaded.keys() == ours.state_dict().keys()
    assert all(torch.equal(reloaded[key], value) for key, value in ours.state_dict().items())


def test_fresh_model_is_adaln_zero_and_t_broadcasts():
    model = MMDiT(MMDiTConfig(**TINY))
    x, t, context, pooled = inputs(3, 8, 8)
    assert torch.count_nonzero(model(x, t, context, pooled)) == 0  # adaLN-Zero: output starts at 0
    randomize(model, seed=5)
    with torch.no_grad():
        per_sample = model(x, torch.full((3,), 0.3), context, pooled)
        assert torch.allclose(model(x, 0.3, context, pooled), per_sample, atol=1e-6)
        assert torch.allclose(model(x, torch.tensor([0.3]), context, pooled), per_sample, atol=1e-6)
        single = model(x[:1], torch.tensor([0.3]), context[:1], pooled[:1])
    assert torch.allclose(single, per_sample[:1], atol=1e-5)


@pytest.mark.parametrize("preset, billions", [("d24", 2.0), ("d38", 8.1)])
def test_presets_have_paper_sizes(preset, billions):
    config = MMDiTConfig.from_preset(preset)
    assert config.hidden_size == 64 * config.num_layers == 64 * config.num_attention_heads
    with torch.device("meta"):
        count = sum(p.numel() for p in MMDiT(config).parameters())
    assert abs(count / 1e9 - billions) < 0.06
    assert abs(count - 147_456 * config.num_layers**3) / count < 0.03


def test_config_rejects_mismatched_caption_width():
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(**{**TINY, "caption_projection_dim": 48})


@pytest.mark.parametrize("dual_layers", [(), (0, 2)])
def test_flops_formula_matches_flop_counter(dual_layers):
    config = MMDiTConfig(**TINY, dual_attention_layers=dual_layers)
    model = MMDiT(config)
    randomize(model, seed=0)
    batch, height, width = 2, 8, 12
    x, t, context, pooled = inputs(batch, height, width)
    expected = mmdit_flops(config, height, width, TEXT_TOKENS)
    with sdpa_kernel(SDPBackend.MATH):  # the math path is made of counted matmuls on CPU
        with FlopCounterMode(display=False) as forward_counter:
            with torch.no_grad():
                model(x, t, context, pooled)
        with FlopCounterMode(display=False) as step_counter:
            model(x, t, context, pooled).square().mean().backward()
    assert forward_counter.get_total_flops() == batch * expected.forward
    assert step_counter.get_total_flops() == batch * expected.training_step


def test_compiles_without_graph_breaks():
    """fullgraph=True raises on any graph break; aot_eager also traces the backward graph."""
    torch._dynamo.reset()
    model = MMDiT(MMDiTConfig(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,)))
    randomize(model, seed=2)
    x, t, context, pooled = inputs(2, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x, t, context, pooled).square().mean().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, t, context, pooled).square().mean().backward()
    for compiled_grad, param in zip(compiled_grads, model.parameters(), strict=True):
        assert torch.allclose(compiled_grad, param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a cold inductor build of even one block takes 80-140 s on 2 busy cores
@pytest.mark.timeout(600)
def test_inductor_compiled_forward_matches_eager():
    torch._dynamo.reset()
    model = MMDiT(MMDiTConfig(**{**TINY, "num_layers": 1}))
    randomize(model, seed=2)
    x, t, context, pooled = inputs(2, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, context, pooled), model(x, t, context, pooled), atol=1e-4)


def test_attention_under_cpu_autocast_runs_in_fp32_and_returns_bf16():
    # CPU autocast would run SDPA in bf16 (3-4x slower there); ours computes it in fp32 on
    # the bf16 inputs, so it must match an fp32 reference to fp32 accuracy, then round.
    from model.mmdit import attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, 32, generator=generator).bfloat16() for _ in range(3))
    q.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v))
    ).transpose(1, 2).flatten(2)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 40, 128)
    torch.testing.assert_close(out.float(), reference.bfloat16().float(), rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
