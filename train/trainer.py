"""The rectified-flow training loop over precomputed shards, with accelerate (DDP or FSDP2).

One optimizer step = `grad_accum` micro-batches, each of one bucket shape. The noise and t of
every step come from one generator per rank whose state is checkpointed with everything
else, so a resumed run repeats the steps of an uninterrupted one bit for bit (on CPU).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from tqdm.auto import tqdm

from model.flops import mmdit_flops
from model.flow import RectifiedFlow, sample_t, shift_t
from pipeline.core.config import config_hash, write_resolved_config
from pipeline.encode.training_shards import DatasetManifest
from train import checkpoint as ckpt
from train.data import DataPosition, ShardBatches, make_loader
from train.ema import ExponentialMovingAverage
from train.metrics import RunLogger, peak_flops
from train.model_setup import build_model, build_model_config, check_dataset
from train.objective import flow_config, per_sample_loss
from train.optim import build_optimizer, build_scheduler
from train.parallel import make_strategy
from train.precision import resolve_mixed_precision, training_device
from train.validation import Validator

log = logging.getLogger(__name__)
BATCH_TENSORS = ("latent", "context", "pooled")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward; instance-level, so parameter names stay unchanged."""
    for block in model.transformer_blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False)

        block.forward = checkpointed


class Trainer:
    def __init__(self, sections: dict[str, Any]):
        run = sections["run"]
        optim, precision_note = resolve_mixed_precision(sections["optim"], training_device(run))
        self.cfg = {**sections, "optim": optim}  # the resolved precision is what gets saved
        self.out_dir = Path(run.output_dir)
        # a local path or an fsspec URL; a Path keeps local checkpoint paths Paths
        self.checkpoint_root = sections["checkpoint"].dir or self.out_dir / "checkpoints"
        self.accelerator = Accelerator(cpu=run.cpu, mixed_precision=optim.mixed_precision)
        if self.accelerator.is_main_process:
            log.info(precision_note)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        torch.manual_seed(run.seed)
        self.model_config = build_model_config(sections["model"])
        self.manifest = DatasetManifest.load(sections["data"].path)
        check_dataset(self.manifest, self.model_config, sections["model"], sections["data"].path)
        self.flow = RectifiedFlow(flow_config(sections["objective"]))
        self.strategy = make_strategy(run.distributed, self.accelerator)
        self.noise_generator = torch.Generator(self.accelerator.device)
        self.noise_generator.manual_seed(run.seed * 1_000_003 + self.rank)
        self._build_model()
        self.step, self.nan_skips = 0, 0
        self.position = DataPosition(self.world * max(1, sections["data"].num_workers))
        self._maybe_resume()
        self.batches = self._batch_iterator()
        self.validator = Validator(sections["validation"], self.accelerator, self.flow,
                                   self.model_config, self.manifest,
                                   collective=self.strategy.collective_forward)
        peak = peak_flops(sections["logging"], self.accelerator.device)
        self.logger = RunLogger(self.out_dir, sections["logging"], self.accelerator.is_main_process, peak)

    def _build_model(self) -> None:
        optim = self.cfg["optim"]
        self.raw_model = build_model(self.cfg["model"]).to(self.accelerator.device)
        if optim.activation_checkpointing:
            enable_activation_checkpointing(self.raw_model)
        if optim.compile:
            self.raw_model.compile()
        made = {}

        def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
            made["optimizer"] = build_optimizer(model, optim)
            return made["optimizer"]

        self.model, self.optimizer = self.strategy.wrap(self.raw_model, optimizer_for)
        self.scheduler = build_scheduler(made["optimizer"], optim, self.cfg["run"].max_steps)
        # after wrapping, so that under FSDP the fp32 EMA is sharded like the parameters
        self.ema = (ExponentialMovingAverage(self.raw_model, self.cfg["ema"])
                    if self.cfg["ema"].enabled else None)

    def _maybe_resume(self) -> None:
        path = ckpt.find_resume(self.checkpoint_root, self.cfg["checkpoint"].resume)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.rank)
        self.strategy.load_model_state(self.raw_model, state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(self.strategy.like_parameters(self.raw_model, state["ema"]))
        self.strategy.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"], self.noise_generator)
        self.step = state["trainer"]["step"]
        self.nan_skips = state["trainer"]["nan_skips"]
        self.position.slots = state["data"]["slots"]
        if state["data"]["num_slots"] != self.position.num_slots:
            raise ValueError(f"{path} was written with {state['data']['num_slots']} reader slots "
                             f"(ranks x workers); this run has {self.position.num_slots}")
        log.info("resumed from %s at step %d", path, self.step)

    def _batch_iterator(self):
        dataset = ShardBatches(self.cfg["data"], self.rank, self.world, self.position.state_dict())
        return iter(make_loader(dataset))

    def _next_batch(self) -> dict[str, Any]:
        batch = next(self.batches)
        self.position.record(batch)
        device = self.accelerator.device
        for name in BATCH_TENSORS:
            batch[name] = batch[name].to(device, non_blocking=True).float()
        return batch

    def _micro_step(self, batch: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its per-sample losses."""
        x0 = batch["latent"]
        gen = self.noise_generator
        t = shift_t(sample_t(x0.shape[0], self.flow.cfg, gen, x0.device), self.flow.cfg.shift)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        sync = self.strategy.gradient_sync(self.model, enabled=last)
        with sync, self.accelerator.autocast():
            losses = per_sample_loss(self.model, self.flow, batch, t, noise)
            self.accelerator.backward(losses.mean() / self.cfg["optim"].grad_accum)
        self.logger.add_losses(losses, t)
        return losses.detach()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; a non-finite loss or gradient skips the update (all ranks)."""
        optim = self.cfg["optim"]
        started, waited, losses, keys, flops = time.perf_counter(), 0.0, [], [], 0.0
        for micro in range(optim.grad_accum):
            before = time.perf_counter()
            batch = self._next_batch()
            waited += time.perf_counter() - before
            losses.append(self._micro_step(batch, last=micro == optim.grad_accum - 1))
            keys += batch["keys"]
            flops += self._flops(batch)
        local = torch.cat(losses)
        loss = self.accelerator.reduce(local.mean(), "mean").item()
        max_norm = optim.max_grad_norm if optim.max_grad_norm > 0 else math.inf
        grad_norm = self.strategy.clip(self.model, max_norm)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._record_skip(local, keys)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        if not skipped and self.ema is not None:
            self.ema.update(self.raw_model, self.step)
        record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "skipped": skipped, "keys": keys}
        self.logger.add_step(record, len(keys), flops, time.perf_counter() - started, waited)
        return record

    def _record_skip(self, local: torch.Tensor, keys: list[str]) -> None:
        self.nan_skips += 1
        bad = [k for k, v in zip(keys, local.tolist(), strict=True) if not math.isfinite(v)]
        log.warning("step %d: non-finite loss or gradient, update skipped (%d so far); rank %d "
                    "samples with non-finite loss: %s", self.step + 1, self.nan_skips, self.rank,
                    bad or "none (another rank or the gradient)")

    def _flops(self, batch: dict) -> float:
        if self.logger.peak <= 0:
            return 0.0
        _, _, h, w = batch["latent"].shape
        per_sample = mmdit_flops(self.model_config, h, w, batch["context"].shape[1]).training_step
        return float(per_sample * batch["latent"].shape[0])

    def save_checkpoint(self) -> None:
        acc, root = self.accelerator, self.checkpoint_root
        target = ckpt.checkpoint_path(root, self.step)
        if acc.is_main_process:
            ckpt.begin(target)
        acc.wait_for_everyone()
        ckpt.write_rank(target, self.rank, ckpt.rng_state(self.noise_generator),
                        self.position.state_dict())
        # gathering full tensors is collective under FSDP: every rank takes part
        model_state = self.strategy.model_state(self.raw_model)
        optimizer_state = self.strategy.optimizer_state(self.raw_model, self.optimizer)
        ema_state = self.strategy.full_tensors(self.ema.state_dict()) if self.ema else None
        if acc.is_main_process:
            ckpt.write_shared(target, model_state, ema_state, self.model_config.to_dict(),
                              optimizer_state, self.scheduler.state_dict())
        acc.wait_for_everyone()  # every rank's files are published: now the marker
        if acc.is_main_process:
            trainer_state = {"step": self.step, "nan_skips": self.nan_skips,
                             "config_hash": config_hash(self.cfg), "world_size": self.world}
            ckpt.finish(root, self.step, trainer_state, self.cfg["checkpoint"].keep_last)
        acc.wait_for_everyone()

    def _periodic(self) -> None:
        step, cfg = self.step, self.cfg
        if step % cfg["logging"].every == 0 or step == cfg["run"].max_steps:
            scalars = self.logger.flush(step, lambda x: self.accelerator.reduce(x, "sum"), self.world)
            self.logger.scalar("train/nan_skips", self.nan_skips, step)
            log.info("step %d: %s", step, {k: round(v, 5) for k, v in scalars.items()})
        self.validator.maybe_run(step, self.raw_model, self.ema, self.logger, self.out_dir)
        if step % cfg["checkpoint"].every == 0 or step == cfg["run"].max_steps:
            self.save_checkpoint()

    def fit(self) -> int:
        """Train to run.max_steps; returns the number of skipped (non-finite) steps."""
        if self.accelerator.is_main_process:
            write_resolved_config(self.out_dir, self.cfg)
        max_steps = self.cfg["run"].max_steps
        bar = tqdm(total=max_steps, initial=self.step, desc="train",
                   disable=not self.accelerator.is_main_process)
        while self.step < max_steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            self._periodic()
        bar.close()
        self.logger.close()
        return self.nan_skips
