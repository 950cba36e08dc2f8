"""Exponential moving average of the trainable weights, kept in fp32 whatever the model dtype."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from train.config import EmaConfig


class ExponentialMovingAverage:
    def __init__(self, model: nn.Module, config: EmaConfig):
        self.config = config
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step `step` (1-based)."""
        if step % self.config.interval:
            return
        decay = 0.0 if step <= self.config.start_step else self.config.decay
        for name, param in model.named_parameters():
            if name in self.shadow:
                # shadow <- decay * shadow + (1 - decay) * param, in fp32
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (validation, sampling)."""
        _reshard(model)
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.shadow:
                    param.copy_(self.shadow[name])
        try:
            yield model
        finally:
            _reshard(model)  # FSDP may leave the root's parameters gathered after a forward
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])


def _reshard(model: nn.Module) -> None:
    """Put FSDP2-sharded parameters back into their sharded form; no-op otherwise."""
    if hasattr(model, "reshard"):
        model.reshard()
