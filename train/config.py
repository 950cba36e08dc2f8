"""Typed config sections of `rectiflow train`; each component receives only its own section.

Defaults follow the SD3 paper where it states a value (logit-normal(0, 1), encoder dropout
0.464, 50% original captions, lr 1e-4 with 1,000 warmup steps, validation at 8 t) and are
marked as choices where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.core.config import load_config


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    max_steps: int = 1000
    seed: int = 0
    # "ddp" replicates the model on every rank; "fsdp" (FSDP2) shards parameters, gradients,
    # AdamW moments and the EMA over the ranks, for presets whose replicas do not fit.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    cpu: bool = False  # force CPU even when a GPU is visible (tests, gloo DDP)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1, got {self.max_steps}")



@dataclass
class DataConfig:
    path: str = ""  # dataset directory (local path or fsspec URL) holding dataset.json
    batch_size: int = 4  # per rank and micro-batch; every batch holds one bucket shape
    num_workers: int = 0
    prefetch_factor: int = 2
    seed: int = 0
    synthetic_caption_prob: float = 0.5  # SD3: 50% original, 50% synthetic captions
    encoder_dropout: float = 0.464  # each of CLIP-L, CLIP-G, T5 zeroed independently
    # "zeros" is the paper's dropout; "null_prompt" uses the dataset's encoding of "".
    dropout_fill: Literal["zeros", "null_prompt"] = "zeros"
    sample_posterior: bool = True  # z = mean + std * eps when the shards store latent_std
    on_corrupt: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        for name in ("synthetic_caption_prob", "encoder_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name of model.mmdit's preset table
    mmdit: dict[str, Any] = field(default_factory=dict)  # MMDiTConfig fields over the preset
    # A diffusers SD3 transformer directory (or an SD3 directory with transformer/) to
    # fine-tune from; its config replaces preset and mmdit.
    pretrained: str = ""
    vae_id: str = ""  # when set, the dataset's VAE id must equal it


@dataclass
class ObjectiveConfig:
    t_sampler: Literal["logit_normal", "mode", "cosmap", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # t' = a t / (1 + (a - 1) t); SD3 uses 3.0 at 1024^2
    # "none" is the paper's plain velocity loss; "sigma_squared" equals diffusers' default
    # output preconditioning; "logit_normal" weighs uniform t by the logit-normal density.
    weighting: Literal["none", "sigma_squared", "logit_normal"] = "none"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8  # 1e-15 with QK norm and bf16, as in SD3
    warmup_steps: int = 1000
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # "auto": bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), "no" (fp32) elsewhere (train/precision.py). The trainer saves the resolved value
    # here in config.resolved.toml and the request in mixed_precision_requested.
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    mixed_precision_requested: Literal["auto"] | None = None  # written by the trainer
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two values, got {self.betas}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999
    interval: int = 1  # update every `interval` optimizer steps
    start_step: int = 0  # copy the weights until this step, then average


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto" (latest in dir), "none", or a checkpoint directory or URL
    dir: str = ""  # where checkpoints go: a local path or an fsspec URL; "" = output_dir/checkpoints


@dataclass
class ValidationConfig:
    path: str = ""  # held-out dataset directory; empty disables validation
    every: int = 1000
    t_values: list[float] = field(
        default_factory=lambda: [i / 8 for i in range(8)]  # 8 equally spaced t, t = 1 excluded
    )
    batch_size: int = 8
    max_samples: int = 64
    seed: int = 1234  # fixed noise: the same for every evaluation
    sample_every: int = 0  # 0 disables sample grids
    sample_count: int = 4
    sample_steps: int = 28
    cfg_scale: float = 5.0
    sample_shift: float = 3.0
    vae: str = ""  # SD3 directory or VAE directory to decode grids; empty: latent preview


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    t_bins: int = 8  # loss per t-bin in [0, 1]
    peak_tflops: float = 0.0  # accelerator peak (bf16 dense) for MFU; 0 picks by device name


TRAIN_SCHEMA: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "ema": EmaConfig,
    "checkpoint": CheckpointConfig,
    "validation": ValidationConfig,
    "logging": LoggingConfig,
}


def load_train_config(path: str | None, overrides: list[str] = ()) -> dict[str, Any]:
    """All sections of a training preset with `--section.key=value` overrides applied."""
    return load_config(TRAIN_SCHEMA, path, overrides)
