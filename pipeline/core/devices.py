"""Where a model stage runs and in which precision: "auto" picks what the machine has."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU instruction sets with bf16 arithmetic. Without them PyTorch emulates bf16 through fp32
# conversions: the demo's MMDiT step ran 8.8x slower under bf16 autocast on an AVX2-only EPYC.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs, fp32 on CPUs (where fp16 kernels are slow or missing)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def cpu_flags(cpuinfo: Path | None = None) -> set[str] | None:
    """The CPU feature flags Linux reports (first core), or None where it reports none."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:  # not Linux, or /proc not mounted
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why in a few words (for the log).

    The one capability probe behind every "auto" precision; tests fake it with monkeypatch.
    """
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs accept bf16 tensors but run them slowly.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"cuda {'with' if native else 'without'} native bf16"
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is None:
            return False, "cpu flags unknown (no /proc/cpuinfo)"
        found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
        if found:
            return True, f"cpu with {'/'.join(found)}"
        return False, f"cpu without {'/'.join(BF16_CPU_FLAGS)}"
    return False, f"{device.type}: bf16 not known to be native"
