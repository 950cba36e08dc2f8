"""The trainer's use of model/flow.py: config mapping and the per-sample velocity loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.flow import FlowConfig, RectifiedFlow, noised, velocity_target
from train.config import ObjectiveConfig


def flow_config(objective: ObjectiveConfig) -> FlowConfig:
    return FlowConfig(t_sampler=objective.t_sampler, logit_mean=objective.logit_mean,
                      logit_std=objective.logit_std, mode_scale=objective.mode_scale,
                      shift=objective.shift, loss_weighting=objective.weighting)


def per_sample_loss(model: nn.Module, flow: RectifiedFlow, batch: dict, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """(B,) weighted velocity losses of one batch at given t (B,) and noise (B, C, H, W)."""
    x0 = batch["latent"]
    prediction = model(noised(x0, noise, t), t, batch["context"], batch["pooled"])
    error = (prediction.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1)
    return flow.loss_weight(t.float()) * error
