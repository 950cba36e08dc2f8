"""Rectified flow (SD3 section 2-3), kept apart from any network.

z_t = (1 - t) x0 + t eps with t = 0 data and t = 1 noise; the network regresses the velocity
eps - x0. t is drawn from one of the paper's densities, optionally shifted towards noise for
high resolutions, and stays a continuous fp32 value (never snapped to a 1000-level grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

T_SAMPLERS = ("logit_normal", "mode", "cosmap", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_squared", "logit_normal")


@dataclass
class FlowConfig:
    t_sampler: str = "logit_normal"  # the paper's overall winner, with m = 0, s = 1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # s of mode sampling; monotone for -1 <= s <= 2 / (pi - 2)
    shift: float | None = None  # a of t' = a t / (1 + (a - 1) t); None: from resolution
    base_pixels: int = 256 * 256  # resolution the shift is 1 at
    # "none": the paper's plain velocity loss. "sigma_squared": what diffusers' SD3 script's
    # default output preconditioning amounts to (x0-prediction loss = t^2 |v - v_theta|^2).
    # "logit_normal": weight by the logit-normal density (use with uniform t).
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.t_sampler not in T_SAMPLERS:
            raise ValueError(f"t_sampler={self.t_sampler!r}: allowed {T_SAMPLERS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={self.loss_weighting!r}: allowed {LOSS_WEIGHTINGS}")
        if self.t_sampler == "mode" and not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(f"mode_scale={self.mode_scale}: allowed [-1, {2 / (math.pi - 2):.4f}]")


def broadcast_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar t -> shape (B, 1, 1, ...) matching `like`'s rank."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device).reshape(-1)
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = broadcast_t(t, x0)
    return ((1 - t) * x0 + t * noise).to(x0.dtype)  # z_t


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0  # d z_t / d t


def shift_t(t: torch.Tensor | float, shift: float):
    """The resolution-dependent shift; shift > 1 moves t towards noise. shift_t(0.5, 3) = 0.75."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(pixels: int, base_pixels: int = 256 * 256) -> float:
    """a = sqrt(m / n): the shift that keeps the signal-to-noise ratio of a base resolution."""
    return math.sqrt(pixels / base_pixels)


# ----------------------------------------------------------------------------- t densities


def _mode_map(u: torch.Tensor, s: float) -> torch.Tensor:
    return 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def sample_t(
    n: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(n,) fp32 training times in (0, 1) from the configured density, before any shift."""
    if cfg.t_sampler == "logit_normal":
        u = torch.randn(n, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        return torch.sigmoid(u)
    u = torch.rand(n, generator=generator, device=device)
    if cfg.t_sampler == "mode":
        return _mode_map(u, cfg.mode_scale)
    if cfg.t_sampler == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    return u


def t_cdf(t, cfg: FlowConfig):
    """Analytic CDF of the configured density (numpy in, numpy out); for tests and plots."""
    import numpy as np
    from scipy import stats

    t = np.asarray(t, dtype=np.float64)
    if cfg.t_sampler == "logit_normal":
        return stats.norm.cdf((np.log(t / (1 - t)) - cfg.logit_mean) / cfg.logit_std)
    if cfg.t_sampler == "cosmap":  # invert t = 1 - 1 / (tan(pi u / 2) + 1)
        return 2 / np.pi * np.arctan(t / (1 - t))
    if cfg.t_sampler == "mode":  # f is decreasing from f(0) = 1 to f(1) = 0: P(T <= t) = 1 - u(t)
        lo, hi = np.zeros_like(t), np.ones_like(t)
        for _ in range(60):  # bisection on the monotone map
            mid = (lo + hi) / 2
            above = 1 - mid - cfg.mode_scale * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid) > t
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2
    return np.clip(t, 0, 1)


# ----------------------------------------------------------------------------- objective


class RectifiedFlow:
    """Draws (z_t, t, target) for a batch of clean latents and weighs the velocity loss."""

    def __init__(self, cfg: FlowConfig):
        self.cfg = cfg

    def shift_for(self, height: int, width: int) -> float:
        """Shift for images of height x width pixels (not latent cells: base_pixels is in pixels)."""
        return self.cfg.shift if self.cfg.shift is not None else resolution_shift(
            height * width, self.cfg.base_pixels)

    def training_inputs(self, x0: torch.Tensor, shift: float = 1.0,
                        generator: torch.Generator | None = None):
        """x0 (B, C, H, W) -> z_t (B, C, H, W), t (B,) fp32, target (B, C, H, W)."""
        t = shift_t(sample_t(x0.shape[0], self.cfg, generator, x0.device), shift)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return noised(x0, noise, t), t, velocity_target(x0, noise)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss_weighting == "sigma_squared":
            return t**2
        if self.cfg.loss_weighting == "logit_normal":
            logit = torch.log(t / (1 - t))
            z = (logit - self.cfg.logit_mean) / self.cfg.logit_std
            density = torch.exp(-0.5 * z**2) / (self.cfg.logit_std * math.sqrt(2 * math.pi))
            return density / (t * (1 - t))
        return torch.ones_like(t)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the (weighted) per-sample mean squared velocity error."""
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        return (self.loss_weight(t.float()) * per_sample).mean()
