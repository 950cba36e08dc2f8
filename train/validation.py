"""SD3's validation metric and sample grids, on a held-out dataset and the EMA weights.

The loss is the plain velocity loss at fixed t values (8 equally spaced in [0, 1) by default)
with noise fixed per (sample, t), so two evaluations differ only through the weights. Samples
are split across ranks by index and the sums reduced, so any world size gives the same value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.flow import RectifiedFlow
from model.sampling import sample_euler
from pipeline.core import storage
from pipeline.core.decode import decode_for_model
from pipeline.encode.training_shards import DatasetManifest
from train.config import DataConfig, ModelConfig, ValidationConfig
from train.data import (
    SampleDecoder,
    assemble_context,
    iterate_tar,
    load_null_prompt,
)
from train.model_setup import check_dataset
from train.objective import per_sample_loss

log = logging.getLogger(__name__)


def fixed_noise(seed: int, uid: str, index: int, shape, device) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{uid}/{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(shape, generator=gen).to(device)


def load_validation_samples(config: ValidationConfig, manifest: DatasetManifest) -> list[dict]:
    """The first max_samples samples of the held-out set, original captions, no dropout."""
    plain = DataConfig(path=config.path, synthetic_caption_prob=0.0, encoder_dropout=0.0,
                       sample_posterior=False)
    decoder = SampleDecoder(manifest, plain)
    samples = []
    for shard in manifest.shards:
        for raw in iterate_tar(storage.join(config.path, shard.name)):
            samples.append({"uid": raw["__key__"], **decoder.decode(raw, 0, raw["__key__"])})
            if len(samples) >= config.max_samples:
                return samples
    return samples


class Validator:
    def __init__(self, config: ValidationConfig, accelerator, flow: RectifiedFlow, model_config,
                 train_manifest: DatasetManifest, collective: bool = False):
        # collective: the model is sharded and every forward is a collective, so all ranks run
        # the same forwards (padding batches are computed and ignored; every rank samples).
        self.config, self.accelerator, self.collective = config, accelerator, collective
        self.flow = RectifiedFlow(dataclasses.replace(flow.cfg, loss_weighting="none"))
        self.enabled = bool(config.path)
        if not self.enabled:
            return
        self.manifest = DatasetManifest.load(config.path)
        check_dataset(self.manifest, model_config, ModelConfig(vae_id=train_manifest.vae.id),
                      config.path)  # held-out latents must come from the training data's VAE
        self.samples = load_validation_samples(config, self.manifest)
        if not self.samples:
            raise ValueError(f"validation.path={config.path!r} holds no samples")
        self.vae = None

    def maybe_run(self, step: int, model, ema, logger, out_dir: Path) -> dict[str, float] | None:
        if not self.enabled:
            return None
        every, sample_every = self.config.every, self.config.sample_every
        run_loss = every > 0 and step % every == 0
        run_samples = sample_every > 0 and step % sample_every == 0
        if not (run_loss or run_samples):
            return None
        result = None
        with _evaluation(model, ema) as eval_model:
            if run_loss:
                result = self.loss(eval_model)
                for name, value in result.items():
                    logger.scalar(f"val/{name}", value, step)
                if self.accelerator.is_main_process:
                    with open(out_dir / "validation.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **result}) + "\n")
                log.info("step %d validation: %s", step, result)
            if run_samples and (self.accelerator.is_main_process or self.collective):
                path = self.sample_grid(eval_model, out_dir / "samples" / f"step-{step:08d}.png")
                if path is not None:
                    grid = decode_for_model(path.read_bytes(), None).image  # the PNG as written
                    logger.image("val/samples", np.asarray(grid), step)
        self.accelerator.wait_for_everyone()
        return result

    @torch.no_grad()
    def loss(self, model) -> dict[str, float]:
        """{'loss': mean over t, 'loss_t0.125': ...} reduced over ranks."""
        device, rank, world = self.accelerator.device, self.accelerator.process_index, self.accelerator.num_processes
        t_values = self.config.t_values
        sums = torch.zeros(len(t_values) + 1, dtype=torch.float64, device=device)
        batches = list(self._batches(self.samples, device))
        rounds = -(-len(batches) // world)  # the same number of forwards on every rank
        for index in range(rank, rounds * world, world):
            if index >= len(batches) and not self.collective:
                break
            batch, counted = (batches[index], True) if index < len(batches) else (batches[0], False)
            for i, t_value in enumerate(t_values):
                noise = torch.stack([fixed_noise(self.config.seed, uid, i, batch["latent"].shape[1:], device)
                                     for uid in batch["uids"]])
                t = torch.full((len(batch["uids"]),), t_value, device=device)
                with self.accelerator.autocast():
                    losses = per_sample_loss(model, self.flow, batch, t, noise)
                sums[i] += losses.double().sum() * counted
            sums[-1] += len(batch["uids"]) * counted
        sums = self.accelerator.reduce(sums, "sum")
        per_t = (sums[:-1] / sums[-1]).tolist()
        result = {f"loss_t{t:.3f}": value for t, value in zip(t_values, per_t, strict=True)}
        return {"loss": float(np.mean(per_t)), **result}

    def _batches(self, samples: list[dict], device):
        by_shape: dict[tuple, list[dict]] = {}
        for sample in samples:
            by_shape.setdefault(tuple(sample["latent"].shape), []).append(sample)
        size = self.config.batch_size
        for group in by_shape.values():
            for start in range(0, len(group), size):
                chunk = group[start:start + size]
                batch = {k: torch.stack([s[k] for s in chunk]).to(device).float()
                         for k in ("latent", "context", "pooled")}
                yield {**batch, "uids": [s["uid"] for s in chunk]}

    @torch.no_grad()
    def sample_grid(self, model, path: Path) -> Path | None:
        """Euler + CFG samples of the first held-out captions, side by side, as one PNG."""
        device = self.accelerator.device
        uncond = self._null_condition(device)
        images = []
        for index, sample in enumerate(self.samples[:self.config.sample_count]):
            cond = {"context": sample["context"][None].to(device).float(),
                    "pooled": sample["pooled"][None].to(device).float()}
            noise = fixed_noise(self.config.seed, sample["uid"], -1, sample["latent"].shape, device)[None]
            with self.accelerator.autocast():
                latent = sample_euler(model, noise, cond, uncond, self.config.cfg_scale,
                                      self.config.sample_steps, self.config.sample_shift)
            images.append(self._to_image(latent.float()))
            log.debug("sample %d of the grid done", index)
        if not self.accelerator.is_main_process:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        _grid(images).save(path)
        return path

    def _null_condition(self, device) -> dict[str, torch.Tensor]:
        try:
            parts = {k: v.float() for k, v in load_null_prompt(self.config.path).items()}
        except FileNotFoundError:
            sample = self.samples[0]
            return {"context": torch.zeros_like(sample["context"])[None].to(device).float(),
                    "pooled": torch.zeros_like(sample["pooled"])[None].to(device).float()}
        context, pooled = assemble_context(parts)
        return {"context": context[None].to(device), "pooled": pooled[None].to(device)}

    def _to_image(self, latent: torch.Tensor) -> Image.Image:
        """Decode with the configured VAE, or show latent channels 0-2 when there is none."""
        if self.config.vae:
            vae = self._load_vae(latent.device)
            raw = latent / self.manifest.vae.scaling_factor + self.manifest.vae.shift_factor
            pixels = vae.decode(raw.to(vae.dtype)).sample[0].float().clamp(-1, 1) * 0.5 + 0.5
        else:
            rgb = latent[0, :3]
            low, high = rgb.amin(), rgb.amax()
            pixels = torch.nn.functional.interpolate(((rgb - low) / (high - low + 1e-6))[None],
                                                     scale_factor=8, mode="nearest")[0]
        array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    def _load_vae(self, device):
        if self.vae is None:
            from diffusers import AutoencoderKL

            root = Path(self.config.vae)
            folder = root / "vae" if (root / "vae" / "config.json").exists() else root
            self.vae = AutoencoderKL.from_pretrained(folder).to(device).eval()
        return self.vae


def _grid(images: list[Image.Image]) -> Image.Image:
    height = max(im.height for im in images)
    grid = Image.new("RGB", (sum(im.width for im in images), height))
    x = 0
    for image in images:
        grid.paste(image, (x, 0))
        x += image.width
    return grid


@contextlib.contextmanager
def _evaluation(model, ema):
    """Evaluate with the EMA weights (when kept) in eval mode, then restore the training state."""
    was_training = model.training
    model.eval()
    try:
        if ema is None:
            yield model
        else:
            with ema.applied_to(model):
                yield model
    finally:
        model.train(was_training)
