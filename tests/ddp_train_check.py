"""Run under `torchrun --nproc_per_node 2` by tests/test_train_ddp.py (gloo on CPU).

1. One optimizer step with DDP, and one with FSDP2, on each rank's half of a fixed batch;
   rank 0 saves the parameters (the test compares them with one process on the whole batch).
2. Short real training runs with the tiny preset on 2 ranks: DDP with validation; FSDP with
   activation checkpointing, checkpoints at steps 2 and 3, then a resume from step 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from model.flow import RectifiedFlow
from train.config import load_train_config
from train.model_setup import build_model
from train.objective import flow_config, per_sample_loss
from train.optim import build_optimizer
from train.parallel import make_strategy

TINY = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.toml"


def fixed_problem(sections, batch: int = 4):
    """A model with every parameter non-zero, a batch, t and noise, all from fixed seeds."""
    torch.manual_seed(0)
    model = build_model(sections["model"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    data = {"latent": torch.randn(batch, 16, 8, 8, generator=gen),
            "context": torch.randn(batch, 77 + 16, 64, generator=gen),
            "pooled": torch.randn(batch, 64, generator=gen)}
    t = torch.rand(batch, generator=gen)
    noise = torch.randn(batch, 16, 8, 8, generator=gen)
    return model, data, t, noise


def one_step(accelerator, sections, rows: slice, kind: str) -> dict[str, torch.Tensor]:
    model, data, t, noise = fixed_problem(sections)
    flow = RectifiedFlow(flow_config(sections["objective"]))
    strategy = make_strategy(kind, accelerator)
    wrapped, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, sections["optim"]))
    part = {k: v[rows] for k, v in data.items()}
    losses = per_sample_loss(wrapped, flow, part, t[rows], noise[rows])
    accelerator.backward(losses.mean())
    strategy.clip(wrapped, sections["optim"].max_grad_norm)
    optimizer.step()
    return strategy.model_state(model)


def train(overrides: list[str]) -> None:
    from train.trainer import Trainer

    Trainer(load_train_config(str(TINY), overrides)).fit()


def main() -> None:
    dataset, out = sys.argv[1], Path(sys.argv[2])
    # fp32 everywhere: the comparison is exact, and the Accelerator built here (no mixed
    # precision) must agree with the trainer's, which "auto" makes bf16 on CPUs with
    # AVX512-BF16/AMX (accelerate refuses a second Accelerator with other settings).
    overrides = [f"--data.path={dataset}", "--run.cpu=true", "--optim.mixed_precision=no"]
    sections = load_train_config(str(TINY), overrides)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    half = 4 // world
    for kind in ("ddp", "fsdp"):
        state = one_step(accelerator, sections, slice(rank * half, (rank + 1) * half), kind)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out / f"{kind}_step.safetensors")
        accelerator.wait_for_everyone()

    short = overrides + ["--data.batch_size=2", "--logging.every=1", "--logging.tensorboard=false",
                         f"--validation.path={dataset}"]
    train(short + [f"--run.output_dir={out / 'ddp'}", "--run.max_steps=3", "--checkpoint.every=3",
                   "--validation.every=3"])
    fsdp = short + ["--run.distributed=fsdp", "--optim.activation_checkpointing=true",
                    "--run.max_steps=3", "--checkpoint.every=2", "--validation.every=3",
                    "--validation.sample_every=3", "--validation.sample_steps=2"]
    train(fsdp + [f"--run.output_dir={out / 'fsdp'}"])
    train(fsdp + [f"--run.output_dir={out / 'fsdp_resumed'}",
                  f"--checkpoint.resume={out / 'fsdp' / 'checkpoints' / 'step-00000002'}"])


if __name__ == "__main__":
    main()
