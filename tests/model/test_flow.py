"""Rectified-flow math: interpolation, target, t densities, shift, loss weightings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from model.flow import (
    FlowConfig,
    RectifiedFlow,
    noised,
    resolution_shift,
    sample_t,
    shift_t,
    t_cdf,
    velocity_target,
)

pytestmark = pytest.mark.timeout(60)

SAMPLER_CONFIGS = [
    FlowConfig(t_sampler="logit_normal"),
    FlowConfig(t_sampler="logit_normal", logit_mean=0.5, logit_std=0.6),
    FlowConfig(t_sampler="mode", mode_scale=1.29),
    FlowConfig(t_sampler="mode", mode_scale=-0.5),
    FlowConfig(t_sampler="cosmap"),
    FlowConfig(t_sampler="uniform"),
]


@pytest.mark.parametrize("cfg", SAMPLER_CONFIGS, ids=lambda c: f"{c.t_sampler}")
def test_t_sampler_follows_its_analytic_density(cfg):
    samples = sample_t(20_000, cfg, torch.Generator().manual_seed(0)).double().numpy()
    assert samples.dtype == np.float64 and ((samples >= 0) & (samples <= 1)).all()
    # Kolmogorov-Smirnov against the analytic CDF: a wrong map or parameter fails at n = 20k.
    assert stats.kstest(samples, lambda t: t_cdf(t, cfg)).pvalue > 1e-3


@pytest.mark.parametrize("cfg, wrong", [
    (FlowConfig(t_sampler="logit_normal"), FlowConfig(t_sampler="uniform")),
    (FlowConfig(t_sampler="mode", mode_scale=1.29), FlowConfig(t_sampler="mode", mode_scale=0.8)),
    (FlowConfig(t_sampler="cosmap"), FlowConfig(t_sampler="logit_normal")),
], ids=["logit_normal", "mode", "cosmap"])
def test_ks_test_tells_the_densities_apart(cfg, wrong):
    samples = sample_t(20_000, cfg, torch.Generator().manual_seed(1)).double().numpy()
    assert stats.kstest(samples, lambda t: t_cdf(t, wrong)).pvalue < 1e-6


def test_mode_sampler_rejects_non_monotone_scale():
    with pytest.raises(ValueError, match="mode_scale"):
        FlowConfig(t_sampler="mode", mode_scale=2.0)


def test_t_stays_continuous_fp32():
    t = sample_t(4096, FlowConfig(), torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32
    assert len(torch.unique(t)) == 4096  # no 1000-level grid


def test_shift():
    assert shift_t(0.5, 3.0) == pytest.approx(0.75)
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_t(t, 1.0), t)
    assert shift_t(0.0, 3.0) == 0.0 and shift_t(1.0, 3.0) == 1.0
    assert resolution_shift(1024 * 1024, 256 * 256) == pytest.approx(4.0)
    assert RectifiedFlow(FlowConfig(shift=3.0)).shift_for(1024, 1024) == 3.0
    assert RectifiedFlow(FlowConfig()).shift_for(512, 512) == pytest.approx(2.0)


@pytest.mark.parametrize("batch", [1, 3])
def test_interpolation_and_target_broadcast_t_per_sample(batch):
    g = torch.Generator().manual_seed(batch)
    x0, noise = torch.randn(batch, 4, 6, 5, generator=g), torch.randn(batch, 4, 6, 5, generator=g)
    t = torch.rand(batch, generator=g)
    z = noised(x0, noise, t)
    for i in range(batch):
        assert torch.allclose(z[i], (1 - t[i]) * x0[i] + t[i] * noise[i], atol=1e-6)
    assert torch.equal(noised(x0, noise, torch.zeros(batch)), x0)
    assert torch.equal(noised(x0, noise, torch.ones(batch)), noise)
    # the target is the time derivative of z_t
    step = 1e-3
    finite_difference = (noised(x0, noise, t + step) - noised(x0, noise, t - step)) / (2 * step)
    assert torch.allclose(finite_difference, velocity_target(x0, noise), atol=1e-2)


def test_training_inputs_are_consistent():
    flow = RectifiedFlow(FlowConfig())
    x0 = torch.randn(3, 16, 4, 4)
    z, t, target = flow.training_inputs(x0, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3,) and t.dtype == torch.float32
    noise = target + x0
    assert torch.allclose(z, noised(x0, noise, t), atol=1e-5)


def test_loss_weightings():
    prediction, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    t = torch.tensor([0.5, 0.25])
    assert RectifiedFlow(FlowConfig()).loss(prediction, target, t).item() == pytest.approx(1.0)
    sigma_squared = RectifiedFlow(FlowConfig(loss_weighting="sigma_squared"))
    assert sigma_squared.loss(prediction, target, t).item() == pytest.approx((0.25 + 0.0625) / 2)
    # sigma^2 weighting is what x0-prediction ("output preconditioning") amounts to
    g = torch.Generator().manual_seed(0)
    x0, noise, v_pred = (torch.randn(2, 4, 2, 2, generator=g) for _ in range(3))
    z = noised(x0, noise, t)
    x0_pred = z - t.view(-1, 1, 1, 1) * v_pred
    x0_loss = (x0_pred - x0).pow(2).flatten(1).mean(1).mean()
    assert sigma_squared.loss(v_pred, velocity_target(x0, noise), t).item() == pytest.approx(
        x0_loss.item(), rel=1e-5)
    logit = RectifiedFlow(FlowConfig(loss_weighting="logit_normal")).loss_weight(torch.tensor([0.5]))
    assert logit.item() == pytest.approx(4 / math.sqrt(2 * math.pi), rel=1e-5)  # pi(0.5)
