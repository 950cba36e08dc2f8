"""Euler + CFG sampling: exactness on a known flow, agreement with diffusers, an overfit check."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from model.flow import FlowConfig, RectifiedFlow
from model.mmdit import MMDiT, MMDiTConfig
from model.sampling import flow_sigmas, guided_velocity, sample_euler

pytestmark = pytest.mark.timeout(120)

TINY = dict(
    sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16,
    pos_embed_max_size=8,
)


def test_flow_sigmas_run_from_one_to_exactly_zero():
    sigmas = flow_sigmas(10, shift=3.0)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[5].item() == pytest.approx(0.75)  # shift(0.5, 3)


@pytest.mark.parametrize("num_steps, shift", [(1, 1.0), (7, 3.0)])
def test_euler_is_exact_on_straight_paths(num_steps, shift):
    # For a single data point x0 the true velocity (z - x0) / t is constant along straight
    # paths, so Euler lands on x0 with any step count or shift.
    x0 = torch.randn(2, 4, 3, 3)
    out = sample_euler(lambda z, t: (z - x0) / t.view(-1, 1, 1, 1), torch.randn(2, 4, 3, 3), {},
                       num_steps=num_steps, shift=shift)
    assert torch.allclose(out, x0, atol=1e-5)


def test_guidance_combines_branches():
    def velocity(z, t, scale):  # a velocity that depends on the condition
        return z * scale.view(-1, 1)

    z, t = torch.ones(2, 3), torch.tensor(0.5)
    cond, uncond = {"scale": torch.tensor([2.0, 2.0])}, {"scale": torch.tensor([1.0, 1.0])}
    assert torch.allclose(guided_velocity(velocity, z, t, cond, uncond, 5.0), torch.full((2, 3), 6.0))
    assert torch.allclose(guided_velocity(velocity, z, t, cond, uncond, 1.0), torch.full((2, 3), 2.0))


def test_same_trajectory_as_diffusers_scheduler():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**TINY)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    batch, steps, shift, scale = 2, 6, 3.0, 4.0
    cond = {"context": torch.randn(batch, 3, 16), "pooled": torch.randn(batch, 16)}
    uncond = {"context": torch.zeros(batch, 3, 16), "pooled": torch.zeros(batch, 16)}
    noise = torch.randn(batch, 16, 8, 8)

    ours: list[torch.Tensor] = []
    sample_euler(model, noise, cond, uncond, cfg_scale=scale, num_steps=steps, shift=shift,
                 callback=lambda step, z: ours.append(z.clone()))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    assert torch.allclose(scheduler.sigmas, flow_sigmas(steps, shift), atol=1e-6)
    latents, theirs = noise.clone(), []
    with torch.no_grad():
        for timestep in scheduler.timesteps:  # the diffusers pipeline's loop
            both = model(torch.cat([latents] * 2), (timestep / 1000).expand(2 * batch),
                         torch.cat([cond["context"], uncond["context"]]),
                         torch.cat([cond["pooled"], uncond["pooled"]]))
            v_cond, v_uncond = both.chunk(2)
            velocity = v_uncond + scale * (v_cond - v_uncond)
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
            theirs.append(latents)
    assert len(ours) == len(theirs) == steps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), step
    assert (ours[-1] - noise).norm() > 1.0  # the trajectory went somewhere


@pytest.fixture
def single_thread():
    # Tiny matmuls gain nothing from threads and suffer badly on a shared, busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_mmdit_overfits_eight_latents(single_thread):
    """Trained on 8 (latent, caption) pairs, 50 Euler steps from fixed noise recover them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(8, 2, 16, generator=g), "pooled": torch.randn(8, 16, generator=g)}
    model = MMDiT(MMDiTConfig(**TINY, in_channels=4, out_channels=4))
    flow = RectifiedFlow(FlowConfig(t_sampler="uniform"))
    steps, repeats = 1500, 2  # repeats: two t per latent and step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    batch = {key: value.repeat(repeats, *[1] * (value.dim() - 1)) for key, value in cond.items()}
    for _ in range(steps):
        z, t, target = flow.training_inputs(x0.repeat(repeats, 1, 1, 1), generator=g)
        loss = flow.loss(model(z, t, **batch), target, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    out = sample_euler(model, noise, cond, num_steps=50)
    relative_errors = (out - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
    assert relative_errors.max() < 0.1, relative_errors
