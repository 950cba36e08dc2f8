"""How the model is spread over ranks: replicated (one process or DDP) or sharded (FSDP2).

Both strategies expose the same few operations, so the training loop and checkpoints do not
branch on the layout: wrap, gradient sync on/off (accumulation), clipping, and full (unsharded)
state dicts in and out. Checkpoints always hold full tensors, so a run saved with FSDP can be
resumed, exported or sampled without it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn


def _local_norm(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class Replicated:
    """A single process, or DDP through accelerate."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    collective_forward = False  # ranks may run different numbers of forwards (no_grad)

    def wrap(self, model: nn.Module, optimizer_factory):
        return self.accelerator.prepare(model, optimizer_factory(model))

    def gradient_sync(self, wrapped: nn.Module, enabled: bool):
        return contextlib.nullcontext() if enabled else self.accelerator.no_sync(wrapped)

    def clip(self, wrapped: nn.Module, max_norm: float) -> float:
        return _local_norm(self.accelerator.clip_grad_norm_(wrapped.parameters(), max_norm))

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def optimizer_state(self, model: nn.Module, optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def like_parameters(self, model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return full


class Sharded:
    """FSDP2 (`fully_shard`): every block, then the root, sharded over all ranks.

    Parameters, gradients, AdamW moments and the EMA are each held 1/world per rank; full
    state dicts are gathered (collectives: every rank calls) only for checkpoints.
    """

    collective_forward = True  # every forward all-gathers: all ranks must run the same ones

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def wrap(self, model: nn.Module, optimizer_factory):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = self.accelerator.device
        mesh = init_device_mesh(device.type, (self.accelerator.num_processes,))
        for block in model.transformer_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, optimizer_factory(model)  # the optimizer must see the sharded parameters

    def gradient_sync(self, wrapped: nn.Module, enabled: bool):
        wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def clip(self, wrapped: nn.Module, max_norm: float) -> float:
        return _local_norm(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm))

    @staticmethod
    def _options(**kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def optimizer_state(self, model: nn.Module, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=self._options())

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=self._options())

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.full_tensor().cpu() if hasattr(t, "full_tensor") else t.cpu()
                for name, t in tensors.items()}

    def like_parameters(self, model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors cut into this rank's shards, shaped like the model's parameters."""
        from torch.distributed.tensor import distribute_tensor

        params = dict(model.named_parameters())
        return {name: distribute_tensor(tensor.to(params[name].device), params[name].device_mesh,
                                        params[name].placements)
                if hasattr(params[name], "device_mesh") else tensor
                for name, tensor in full.items()}


def make_strategy(kind: str, accelerator) -> Replicated | Sharded:
    return Sharded(accelerator) if kind == "fsdp" else Replicated(accelerator)
