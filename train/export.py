"""`rectiflow export CHECKPOINT OUT_DIR [--base SD3_DIR]`: the EMA transformer in diffusers format.

With --base, the other components of an SD3-format directory (VAE, text encoders, tokenizers,
scheduler, model_index.json) are copied next to it, so OUT_DIR loads directly with
`diffusers.StableDiffusion3Pipeline.from_pretrained(OUT_DIR)`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.convert import export_diffusers_transformer
from model.mmdit import MMDiT, MMDiTConfig


def load_trained_model(checkpoint: str | Path, weights: str = "ema") -> MMDiT:
    """The network of a trainer checkpoint, with its EMA (default) or raw weights."""
    checkpoint = Path(checkpoint)
    config = MMDiTConfig(**json.loads((checkpoint / "model_config.json").read_text()))
    state = load_file(checkpoint / "model.safetensors")  # complete: parameters and buffers
    if weights == "ema":
        ema_file = checkpoint / "ema.safetensors"
        if not ema_file.exists():
            raise FileNotFoundError(f"{checkpoint} has no EMA weights (ema.enabled was false); "
                                    "use --weights model")
        state.update(load_file(ema_file))
    with torch.device("meta"):
        model = MMDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export_pipeline(checkpoint: str | Path, out_dir: str | Path, base: str | Path | None = None,
                    weights: str = "ema", dtype: torch.dtype | None = None) -> Path:
    """Write OUT_DIR/transformer and, given an SD3 directory `base`, the rest of the pipeline."""
    out_dir = Path(out_dir)
    model = load_trained_model(checkpoint, weights)
    if dtype is not None:
        model = model.to(dtype)
    export_diffusers_transformer(model, out_dir / "transformer")
    if base is not None:
        base = Path(base)
        if not (base / "model_index.json").exists():
            raise FileNotFoundError(f"--base {base} is not an SD3 pipeline directory (no model_index.json)")
        for item in base.iterdir():
            if item.name == "transformer":
                continue
            target = out_dir / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rectiflow export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trainer checkpoint directory (.../checkpoints/step-N)")
    parser.add_argument("out_dir")
    parser.add_argument("--base", help="SD3-format directory whose other components to copy")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    try:
        out = export_pipeline(args.checkpoint, args.out_dir, args.base, args.weights,
                              getattr(torch, args.dtype))
    except FileNotFoundError as e:
        print(f"rectiflow export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
