"""What a training run reports: a per-step JSONL log and TensorBoard scalars.

train_log.jsonl has one line per optimizer step (loss reduced over ranks, lr, grad norm,
the first rank's sample keys), so a run can be compared step by step with another, e.g. a
resumed one. TensorBoard gets averages over each logging interval: loss, loss per t-bin,
lr, grad norm, samples/s, the fraction of time spent waiting for data, and MFU on GPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.config import LoggingConfig

log = logging.getLogger(__name__)
# bf16 dense peak of common accelerators, TFLOP/s (vendor datasheets, no sparsity)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0, "B200": 2250.0}


def peak_flops(config: LoggingConfig, device: torch.device) -> float:
    """Peak FLOP/s of one device for MFU; 0 when unknown (MFU is then not reported)."""
    if config.peak_tflops > 0:
        return config.peak_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)


@dataclass
class IntervalTotals:
    loss_sum: float = 0.0
    steps: int = 0
    grad_norm_sum: float = 0.0
    samples: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    last_lr: float = 0.0
    bin_sums: list[float] = field(default_factory=list)
    bin_counts: list[int] = field(default_factory=list)


class RunLogger:
    def __init__(self, out_dir: Path, config: LoggingConfig, is_main: bool, peak: float):
        self.config, self.is_main, self.peak, self.out_dir = config, is_main, peak, out_dir
        self.totals = self._fresh()
        self.writer = None
        self.jsonl = None
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "train_log.jsonl", "a")  # noqa: SIM115 (lives with the run)
            if config.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def _fresh(self) -> IntervalTotals:
        bins = self.config.t_bins
        return IntervalTotals(bin_sums=[0.0] * bins, bin_counts=[0] * bins)

    def add_losses(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """Per-sample losses of this rank, binned by t."""
        bins = (t.float().clamp(0, 1 - 1e-6) * self.config.t_bins).long().tolist()
        for b, value in zip(bins, per_sample.detach().float().tolist(), strict=True):
            self.totals.bin_sums[b] += value
            self.totals.bin_counts[b] += 1

    def add_step(self, record: dict[str, Any], samples: int, flops: float, seconds: float,
                 wait_seconds: float) -> None:
        t = self.totals
        if not record["skipped"]:
            t.loss_sum += record["loss"]
            t.grad_norm_sum += record["grad_norm"]
            t.steps += 1
        t.last_lr = record["lr"]
        t.samples, t.flops = t.samples + samples, t.flops + flops
        t.seconds, t.wait_seconds = t.seconds + seconds, t.wait_seconds + wait_seconds
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def flush(self, step: int, reduce_sum, world_size: int) -> dict[str, float]:
        """Reduce the interval over ranks and write it; every rank must call this."""
        t = self.totals
        local = torch.tensor([t.samples, t.flops, *t.bin_sums, *t.bin_counts], dtype=torch.float64)
        total = reduce_sum(local)
        samples, flops = total[0].item(), total[1].item()
        bins = self.config.t_bins
        sums, counts = total[2:2 + bins], total[2 + bins:]
        scalars = {
            "train/loss": t.loss_sum / max(1, t.steps),
            "train/grad_norm": t.grad_norm_sum / max(1, t.steps),
            "train/lr": t.last_lr,
            "perf/samples_per_s": samples / max(t.seconds, 1e-9),
            "perf/data_wait_fraction": t.wait_seconds / max(t.seconds, 1e-9),
        }
        if self.peak > 0:
            scalars["perf/mfu"] = flops / (t.seconds * self.peak * world_size)
        for b in range(bins):
            if counts[b] > 0:
                scalars[f"loss_by_t/bin_{b}"] = (sums[b] / counts[b]).item()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.totals = self._fresh()
        return scalars

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, image_hwc, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(name, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
