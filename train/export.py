"""`rectiflow export CHECKPOINT OUT_DIR [--base SD3_DIR]`: the EMA transformer in diffusers format.

With --base, the other components of an SD3-format directory (VAE, text encoders, tokenizers,
scheduler, model_index.json) are copied next to it, so OUT_DIR loads directly with
`diffusers.StableDiffusion3Pipeline.from_pretrained(OUT_DIR)`.

CHECKPOINT, OUT_DIR and SD3_DIR may be local paths or fsspec URLs (s3://...). The export is
written to a local staging folder and each file is published whole; the file a loader opens
first (model_index.json, or transformer/config.json without --base) is removed first and
published last, so a reader never takes a half-written export for a complete one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from model.convert import export_diffusers_transformer
from model.mmdit import MMDiT, MMDiTConfig
from pipeline.core import storage
from train.checkpoint import load_tensors


def load_trained_model(checkpoint: str | Path, weights: str = "ema") -> MMDiT:
    """The network of a trainer checkpoint, with its EMA (default) or raw weights."""
    config_file = storage.join(checkpoint, "model_config.json")
    if not storage.exists(config_file):
        raise FileNotFoundError(f"{checkpoint} is not a trainer checkpoint (no model_config.json)")
    config = MMDiTConfig(**json.loads(storage.read_bytes(config_file)))
    state = load_tensors(storage.join(checkpoint, "model.safetensors"))  # parameters and buffers
    if weights == "ema":
        ema_file = storage.join(checkpoint, "ema.safetensors")
        if not storage.exists(ema_file):
            raise FileNotFoundError(f"{checkpoint} has no EMA weights (ema.enabled was false); "
                                    "use --weights model")
        state.update(load_tensors(ema_file))
    with torch.device("meta"):
        model = MMDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export_pipeline(checkpoint: str | Path, out_dir: str | Path, base: str | Path | None = None,
                    weights: str = "ema", dtype: torch.dtype | None = None) -> str | Path:
    """Write OUT_DIR/transformer and, given an SD3 directory `base`, the rest of the pipeline."""
    base_files = sd3_components(base) if base is not None else []
    model = load_trained_model(checkpoint, weights)
    if dtype is not None:
        model = model.to(dtype)
    with staging_folder(out_dir) as stage:
        export_diffusers_transformer(model, stage / "transformer")
        for relative, source in base_files:
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            with storage.local_copy(source) as local:
                shutil.copyfile(local, stage / relative)
        publish_folder(stage, out_dir)
    return out_dir


def sd3_components(base: str | Path) -> list[tuple[str, str]]:
    """(relative path, source) of every file of an SD3 directory but its transformer."""
    if not storage.exists(storage.join(base, "model_index.json")):
        raise FileNotFoundError(f"--base {base} is not an SD3 pipeline directory (no model_index.json)")
    root = storage.join(os.fspath(base) if storage.scheme(base) else storage.filesystem(base)[1], "")
    files = [(f[len(root):], f) for f in storage.list_files(base)]
    return [(rel, f) for rel, f in files if rel.split("/")[0] != "transformer"]


@contextlib.contextmanager
def staging_folder(out_dir: str | Path) -> Iterator[Path]:
    """A local folder to build the export in: beside OUT_DIR on local disk (so publishing is
    a rename), in the system temp folder for an object store. Removed afterwards."""
    parent = None
    if not storage.is_remote(out_dir):
        parent = Path(storage.filesystem(out_dir)[1]).parent
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".export-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish_folder(stage: Path, out_dir: str | Path) -> None:
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    marker = "model_index.json" if "model_index.json" in files else "transformer/config.json"
    storage.remove(storage.join(out_dir, marker))  # an older export there is now incomplete
    for relative in [f for f in files if f != marker] + [marker]:
        storage.publish(stage / relative, storage.join(out_dir, relative))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rectiflow export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trainer checkpoint (.../checkpoints/step-N), path or URL")
    parser.add_argument("out_dir", help="a local folder or an fsspec URL")
    parser.add_argument("--base", help="SD3-format directory whose other components to copy")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    try:
        out = export_pipeline(args.checkpoint, args.out_dir, args.base, args.weights,
                              getattr(torch, args.dtype))
    except (FileNotFoundError, storage.StorageError) as e:
        print(f"rectiflow export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
