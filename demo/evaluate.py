"""Prompt adherence of the demo's checkpoints on held-out shapes-world prompts.

Every checkpoint, and the untrained network with the same config and initial seed, samples
the same TEST prompts (held-out combos drawn from the run seed) from the same noise; the
adherence detector reads colour, shape, count, position, size and background back from the
pixels. With the validation loss logged at the same steps this gives SD3's "validation loss
tracks adherence" table for the demo. The last checkpoint also samples the TUNING prompts
(held-out combos fixed for every seed): the only ones any choice of steps, guidance or budget
may look at, reported apart so that no test figure is the one a setting was chosen on.
"""

from __future__ import annotations

import io
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from demo.adherence import detect, evaluate_adherence, truth_of
from demo.shapes_world import read_scenes
from model.mmdit import MMDiT, MMDiTConfig
from model.text_encoding import CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
from train.checkpoint import list_checkpoints
from train.export import load_trained_model
from train.sample import generate_images, text_lengths_of_run


@dataclass
class ModelEvaluation:
    name: str  # "untrained" or "step 300"
    step: int
    accuracy: dict[str, float]
    images: list[bytes] = field(default_factory=list)  # PNG, in prompt order
    detections: list[str] = field(default_factory=list)  # what the detector read, per image


@dataclass
class DemoEvaluation:
    prompts: list[str]  # the test prompts
    truths: list[dict]
    models: list[ModelEvaluation]  # on the test prompts: untrained first, then checkpoints
    val_loss: dict[int, float]  # step -> mean validation loss
    tuning_prompts: list[str] = field(default_factory=list)
    tuning: ModelEvaluation | None = None  # the last checkpoint on the tuning prompts
    # What no model can beat: the detector on the test prompts' true images, and on the
    # autoencoder's reconstructions of them (the MMDiT generates in that latent space).
    ceilings: dict[str, dict[str, float]] = field(default_factory=dict)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class SamplingSettings:
    """How every model is sampled: the run's own validation settings and text lengths, so
    the demo samples with the shift and context the model was trained for."""

    steps: int
    cfg: float
    shift: float
    image_size: int = 64
    seed: int = 1234
    clip_max_length: int = CLIP_MAX_LENGTH
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH

    @classmethod
    def of_run(cls, train_dir: Path, steps: int, image_size: int = 64) -> SamplingSettings:
        resolved = tomllib.loads((Path(train_dir) / "config.resolved.toml").read_text())
        validation = resolved["validation"]
        clip_max_length, t5_max_length = text_lengths_of_run(train_dir)
        return cls(steps, float(validation["cfg_scale"]), float(validation["sample_shift"]),
                   image_size, clip_max_length=clip_max_length, t5_max_length=t5_max_length)


def _evaluate(name, step, model, sd3_dir, prompts, truths, colours, sampling: SamplingSettings):
    images = generate_images(model, sd3_dir, prompts, steps=sampling.steps, cfg=sampling.cfg,
                             shift=sampling.shift, height=sampling.image_size,
                             width=sampling.image_size, seed=sampling.seed,
                             t5_max_length=sampling.t5_max_length,
                             clip_max_length=sampling.clip_max_length)
    detections = [detect(image, colours) for image in images]
    notes = [f"{d.count} {d.size} {d.colour} {d.shape}, {d.position}, {d.background}"
             for d in detections]
    accuracy = evaluate_adherence(images, truths, colours)
    return ModelEvaluation(name, step, accuracy, [_png(i) for i in images], notes)


def read_val_losses(train_dir: Path) -> dict[int, float]:
    path = train_dir / "validation.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


@torch.no_grad()
def adherence_ceilings(urls: Path, sd3_dir: Path, colours, image_size: int = 64) -> dict:
    """Detector accuracy on the test prompts' true images and on decode(encode(image))."""
    from model.loading import load_vae
    from train.autoencoder import load_images

    rows = [row for row, _ in read_scenes(urls, heldout=True, heldout_set="test")]
    truths = [truth_of(row) for row in rows]
    images = torch.cat([load_images(Path(urls).parent / row["file"], image_size) for row in rows])
    vae = load_vae(sd3_dir).eval()
    pixels = vae.decode(vae.encode(images.float() / 127.5 - 1).latent_dist.mode()).sample
    recon = ((pixels.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8)  # (N, 3, S, S)
    as_arrays = [[t.permute(1, 2, 0).numpy() for t in batch] for batch in (images, recon)]
    return {"true images": evaluate_adherence(as_arrays[0], truths, colours),
            "autoencoder reconstructions": evaluate_adherence(as_arrays[1], truths, colours)}


def prompt_set(urls: Path, heldout_set: str) -> tuple[list[str], list[dict]]:
    """(captions, truths) of one held-out set of a world's URL list."""
    scenes = read_scenes(urls, heldout=True, heldout_set=heldout_set)
    return [scene.caption for _, scene in scenes], [truth_of(scene) for _, scene in scenes]


@torch.no_grad()
def evaluate_checkpoints(
    train_dir: Path, sd3_dir: Path, urls: Path, sample_steps: int, image_size: int = 64
) -> DemoEvaluation:
    prompts, truths = prompt_set(urls, "test")
    tuning_prompts, tuning_truths = prompt_set(urls, "tuning")
    colours = json.loads((Path(urls).parent / "world.json").read_text())["config"]["colours"]
    checkpoints = list_checkpoints(Path(train_dir) / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{train_dir}/checkpoints holds no checkpoint to evaluate")
    config = MMDiTConfig(**json.loads((checkpoints[0] / "model_config.json").read_text()))
    sampling = SamplingSettings.of_run(train_dir, sample_steps, image_size)
    torch.manual_seed(0)
    evaluations = [_evaluate("untrained", 0, MMDiT(config).eval(), sd3_dir, prompts, truths,
                             colours, sampling)]
    model = None
    for checkpoint in checkpoints:
        step = int(checkpoint.name.split("-")[-1])
        model = load_trained_model(checkpoint, "ema").eval()
        evaluations.append(_evaluate(f"step {step}", step, model, sd3_dir, prompts, truths,
                                     colours, sampling))
    tuning = None
    if tuning_prompts:
        last = evaluations[-1]
        tuning = _evaluate(f"{last.name} (tuning)", last.step, model, sd3_dir, tuning_prompts,
                           tuning_truths, colours, sampling)
    return DemoEvaluation(prompts, truths, evaluations, read_val_losses(Path(train_dir)),
                          tuning_prompts, tuning, adherence_ceilings(urls, sd3_dir, colours,
                                                                     image_size))
