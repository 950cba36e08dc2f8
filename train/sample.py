"""`rectiflow sample`: PNG files from a trainer checkpoint (or a diffusers transformer) and prompts.

Prompts are encoded with the SD3-format directory's text encoders exactly as diffusers does
(model/text_encoding.py), sampled with Euler + classifier-free guidance (model/sampling.py;
the unconditional branch encodes ""), and decoded with that directory's VAE after undoing
the latent normalisation (z / scaling_factor + shift_factor).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.convert import load_diffusers_transformer
from model.loading import load_text_encoders, load_vae
from model.sampling import sample_euler
from model.text_encoding import (
    CLIP_MAX_LENGTH,
    DEFAULT_T5_MAX_LENGTH,
    assemble_conditioning,
    encode_prompts,
)
from pipeline.encode.training_shards import DatasetManifest
from train.export import load_trained_model


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rectiflow sample", description=__doc__.splitlines()[0])
    parser.add_argument("--sd3", required=True, help="SD3-format directory or id: text encoders + VAE")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trainer checkpoint directory (.../checkpoints/step-N)")
    source.add_argument("--transformer", help="diffusers SD3 transformer directory (default: --sd3's)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument("--out", required=True, help="output directory for NNNN.png")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t5-max-length", type=int, default=None,
                        help="default: the checkpoint's training dataset's, else 77")
    parser.add_argument("--clip-max-length", type=int, default=None,
                        help="default: the checkpoint's training dataset's, else 77")
    parser.add_argument("--no-t5", action="store_true", help="drop T5 (zeros, as in training dropout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_network(args: argparse.Namespace):
    if args.checkpoint:
        return load_trained_model(args.checkpoint, args.weights)
    return load_diffusers_transformer(args.transformer or args.sd3)


def text_lengths_of_run(train_dir: str | Path) -> tuple[int, int]:
    """(clip_max_length, t5_max_length) of the dataset a trainer run trained on; SD3's
    (77, 77) when the run or its dataset cannot be read.

    A model sees its training context lengths at sampling time too: one trained on 24 CLIP
    tokens has never attended to 53 more padding states.
    """
    resolved = Path(train_dir) / "config.resolved.toml"
    try:
        manifest = DatasetManifest.load(tomllib.loads(resolved.read_text())["data"]["path"])
    except (FileNotFoundError, ValueError):
        return CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
    return manifest.clip_max_length, manifest.t5_max_length


@torch.no_grad()
def encode_conditions(sd3: str, prompts: list[str], t5_width: int, t5_max_length: int = 77,
                      use_t5: bool = True, device="cpu",
                      clip_max_length: int = CLIP_MAX_LENGTH) -> tuple[dict, dict]:
    """(cond, uncond) keyword tensors for the velocity function; uncond encodes ""."""
    encoders = load_text_encoders(sd3, load_t5=use_t5)
    pairs = [assemble_conditioning(encode_prompts(encoders, texts, t5_max_length, clip_max_length),
                                   t5_width, t5_max_length) for texts in (prompts, [""])]
    cond, null = pairs
    uncond = tuple(x.expand(len(prompts), *x.shape[1:]) for x in null)
    return ({"context": cond[0].to(device), "pooled": cond[1].to(device)},
            {"context": uncond[0].to(device), "pooled": uncond[1].to(device)})


@torch.no_grad()
def generate_images(model, sd3: str, prompts: list[str], steps: int = 28, cfg: float = 7.0,
                    shift: float = 3.0, height: int = 1024, width: int = 1024, seed: int = 0,
                    t5_max_length: int = 77, use_t5: bool = True,
                    clip_max_length: int = CLIP_MAX_LENGTH) -> list[Image.Image]:
    """Images for `prompts` from an MMDiT `model` with the text encoders and VAE of `sd3`."""
    device = next(model.parameters()).device
    cond, uncond = encode_conditions(sd3, prompts, model.config.joint_attention_dim,
                                     t5_max_length, use_t5, device, clip_max_length)
    vae = load_vae(sd3).to(device)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(prompts), model.config.in_channels, height // down, width // down)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    latents = sample_euler(model, noise, cond, uncond, cfg, steps, shift, progress=True)
    raw = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    pixels = (vae.decode(raw).sample.float().clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1)
    return [Image.fromarray((p.cpu().numpy() * 255).round().astype(np.uint8)) for p in pixels]


def text_lengths(args: argparse.Namespace) -> tuple[int, int]:
    """--clip-max-length / --t5-max-length, defaulting to the checkpoint run's dataset's."""
    clip_default, t5_default = CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
    if args.checkpoint:  # RUN/checkpoints/step-N
        clip_default, t5_default = text_lengths_of_run(Path(args.checkpoint).resolve().parent.parent)
    return (args.clip_max_length or clip_default, args.t5_max_length or t5_default)


def generate(args: argparse.Namespace, prompts: list[str], clip_max_length: int,
             t5_max_length: int) -> list[Image.Image]:
    model = load_network(args).to(args.device).eval()
    return generate_images(model, args.sd3, prompts, args.steps, args.cfg, args.shift,
                           args.height, args.width, args.seed, t5_max_length, not args.no_t5,
                           clip_max_length)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("rectiflow sample: error: give --prompt or --prompts-file")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip_max_length, t5_max_length = text_lengths(args)
    images = generate(args, prompts, clip_max_length, t5_max_length)
    for index, image in enumerate(images):
        image.save(out / f"{index:04d}.png")
    (out / "prompts.json").write_text(json.dumps(
        {"prompts": prompts, "steps": args.steps, "cfg": args.cfg, "shift": args.shift,
         "seed": args.seed, "checkpoint": args.checkpoint, "transformer": args.transformer,
         "clip_max_length": clip_max_length, "t5_max_length": t5_max_length}, indent=1))
    print(f"wrote {len(images)} image(s) to {out}")
    return 0
