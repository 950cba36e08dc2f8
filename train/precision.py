"""`optim.mixed_precision = "auto"`: bf16 where the training device computes it natively.

bf16 autocast pays only where the hardware has bf16 arithmetic (CUDA GPUs from Ampere on,
CPUs with AVX512-BF16 or AMX); elsewhere PyTorch emulates it and the demo's MMDiT step ran
8.8x slower than fp32 (AVX2-only EPYC). "auto" resolves once, before accelerate starts, and
the resolved value is what the run records: `[optim] mixed_precision` in
config.resolved.toml holds "bf16" or "no", and `mixed_precision_requested = "auto"` keeps
what was asked. Explicit "bf16"/"no" are used as given.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.core import devices
from train.config import OptimConfig, RunConfig


def training_device(run: RunConfig) -> torch.device:
    """The device accelerate trains on: the CPU when forced or without CUDA, else the GPU."""
    if run.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_mixed_precision(optim: OptimConfig, device: torch.device) -> tuple[OptimConfig, str]:
    """`optim` with "auto" replaced by what `device` runs natively, and the line to log."""
    if optim.mixed_precision != "auto":
        return optim, f"mixed precision: {optim.mixed_precision} (explicit)"
    # looked up at call time, so that tests can fake the probe with monkeypatch
    native, why = devices.native_bf16(device)
    resolved = replace(optim, mixed_precision="bf16" if native else "no",
                       mixed_precision_requested="auto")
    return resolved, f"mixed precision: auto -> {resolved.mixed_precision} ({why})"
