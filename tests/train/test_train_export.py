"""End to end on the tiny SD3 bundle: the encode stage writes training shards, the trainer
fine-tunes the tiny SD3 transformer on them (validation, VAE-decoded sample grid), the EMA
weights are exported in diffusers format and generate with StableDiffusion3Pipeline and with
`rectiflow sample`."""

from __future__ import annotations

import json

import pytest
import torch
from download_factory import write_download_run
from train_helpers import TINY, single_thread  # noqa: F401 (fixture)

from model.convert import load_diffusers_transformer
from pipeline.encode.buckets import BucketConfig
from pipeline.encode.stage import EncodeConfig, run_encode
from train.cli import main as train_main
from train.export import main as export_main
from train.sample import main as sample_main

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("single_thread")]


def test_finetune_export_and_generate_with_stable_diffusion3_pipeline(tmp_path, tiny_models):
    from diffusers import StableDiffusion3Pipeline

    sd3 = tiny_models / "sd3"
    write_download_run(tmp_path / "curation", shards=2, rows=6)
    run_encode(EncodeConfig(model=str(sd3), bucket=BucketConfig(resolution=64, multiple=16),
                            batch_size=3, clip_max_length=24, t5_max_length=20),
               tmp_path / "curation")
    dataset = tmp_path / "curation" / "encode"
    run = tmp_path / "run"
    assert train_main(["--config", str(TINY), f"--data.path={dataset}", f"--run.output_dir={run}",
                       f"--model.pretrained={sd3}", "--run.max_steps=2", "--checkpoint.every=2",
                       "--optim.lr=1e-4", "--optim.warmup_steps=1", "--ema.decay=0.5",
                       "--data.batch_size=2", f"--validation.path={dataset}", "--validation.every=2",
                       "--validation.sample_every=2", "--validation.sample_steps=2",
                       f"--validation.vae={sd3}", "--logging.tensorboard=false"]) == 0
    assert (run / "samples" / "step-00000002.png").exists()
    assert json.loads((run / "validation.jsonl").read_text().splitlines()[-1])["step"] == 2
    out = tmp_path / "export"
    assert export_main([str(run / "checkpoints" / "step-00000002"), str(out), "--base", str(sd3)]) == 0

    start = load_diffusers_transformer(sd3).state_dict()
    tuned = load_diffusers_transformer(out).state_dict()
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert changed, "fine-tuning left every weight as it was"
    # started from the pretrained weights: 2 small steps move them only a little
    assert max((start[k] - tuned[k]).abs().max().item() for k in start) < 0.05

    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    image = pipe("a red cube", num_inference_steps=2, height=64, width=64, guidance_scale=3.0,
                 output_type="pt", generator=torch.Generator().manual_seed(0), max_sequence_length=77).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()

    samples = tmp_path / "samples"
    assert sample_main(["--sd3", str(sd3), "--checkpoint", str(run / "checkpoints" / "step-00000002"),
                        "--prompt", "a red cube", "--prompt", "a blue ball", "--out", str(samples),
                        "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]) == 0
    # Without --clip/--t5-max-length, sampling uses the lengths the checkpoint trained on.
    settings = json.loads((samples / "prompts.json").read_text())
    assert (settings["clip_max_length"], settings["t5_max_length"]) == (24, 20)
    from PIL import Image

    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (64, 64) for p in pngs)
    import numpy as np

    assert all(np.asarray(Image.open(p)).std() > 0 for p in pngs)  # decoded pictures, not a fill
