"""Euler ODE sampling of a rectified flow from t = 1 (noise) to t = 0 (data), with CFG.

Works over any velocity function v(z, t, **condition), so the trainer's validation, the
`sample` command and tests share it. Same update as diffusers' FlowMatchEulerDiscreteScheduler:
z <- z + (t_next - t) v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from model.flow import shift_t

VelocityFn = Callable[..., torch.Tensor]


def flow_sigmas(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """(num_steps + 1,) times from 1 down to exactly 0, evenly spaced before the shift."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)
    return shift_t(t, shift)


def guided_velocity(
    velocity_fn: VelocityFn, z: torch.Tensor, t: torch.Tensor, cond: dict,
    uncond: dict | None, cfg_scale: float,
) -> torch.Tensor:
    """v_uncond + s (v_cond - v_uncond), both branches in one batched call."""
    batch = z.shape[0]
    t_batch = t.reshape(1).expand(batch)
    if uncond is None or cfg_scale == 1.0:
        return velocity_fn(z, t_batch, **cond)
    both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    v_cond, v_uncond = velocity_fn(torch.cat([z, z]), t_batch.repeat(2), **both).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: dict,
    uncond: dict | None = None,
    cfg_scale: float = 1.0,
    num_steps: int = 28,
    shift: float = 1.0,
    sigmas: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dz/dt = v from t = 1 to 0 starting at `noise`; returns the sample at t = 0.

    `sigmas` (descending, last 0) overrides num_steps/shift. `cond`/`uncond` hold the velocity
    function's keyword tensors (e.g. context, pooled), batch-first. `callback(step, z)` sees z
    after each step.
    """
    if sigmas is None:
        sigmas = flow_sigmas(num_steps, shift, device=noise.device)
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    z = noise.float()
    for step in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        t, t_next = sigmas[step], sigmas[step + 1]
        v = guided_velocity(velocity_fn, z.to(noise.dtype), t, cond, uncond, cfg_scale)
        z = z + (t_next - t) * v.float()  # Euler step in fp32, as diffusers' scheduler
        if callback is not None:
            callback(step, z)
    return z.to(noise.dtype)
