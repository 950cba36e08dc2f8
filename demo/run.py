"""`rectiflow demo [--quick]`: the whole system on an offline synthetic world, end to end.

1. tiny models in the real formats (`rectiflow models make-tiny`);
2. a shapes world with exact captions and web-like noise, served from 127.0.0.1;
3. the curation job on an embedded Ray: download, score, select, dedup, caption;
4. a 16-channel autoencoder trained on the downloaded images, replacing the tiny random VAE,
   then the encode stage (latents + text embeddings into training shards);
5. the MMDiT trained for a bounded number of steps, with checkpoints and validation loss;
6. held-out test prompts (combos drawn from the run seed, `--seed`) sampled from each
   checkpoint and from the untrained model with the same noise, and the fixed tuning prompts
   from the last one, read back by the adherence detector, beside its ceilings (the detector
   on the true images and on the autoencoder's reconstructions);
7. an HTML report whose path is printed.
This module composes; the work is done by the packages it calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DemoSize:
    world_images: int
    heldout: int  # test prompts
    tuning: int  # tuning prompts
    vae_seconds: float
    vae_steps: int
    train_steps: int
    checkpoint_every: int
    sample_steps: int


# The autoencoder trains a fixed 780 steps; the time budget is only a cap against a stuck
# machine, set far above the ~200 s the steps take on 2 AVX2 cores: a 200 s cap cut them to
# 550, 488 and 47 steps on a loaded machine (seed 2's 47-step autoencoder, 17.8 dB, then
# gave 29% colour), and a 90 s budget made 660-710 by machine speed. The MMDiT trains 1,000
# steps: in fp32 on a 2-core AVX2 CPU (no native bf16, so "auto" precision runs fp32) a step
# takes 0.25-0.4 s, and the whole demo must stay near 10 minutes there (2,800 steps took
# 24.7 min); docs/benchmarks.md has what it costs.
FULL = DemoSize(world_images=1500, heldout=48, tuning=24, vae_seconds=900, vae_steps=780,
                train_steps=1000, checkpoint_every=250, sample_steps=20)
QUICK = DemoSize(world_images=200, heldout=12, tuning=6, vae_seconds=120, vae_steps=150,
                 train_steps=30, checkpoint_every=15, sample_steps=8)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def make_world(out: Path, size: DemoSize, base_url: str, seed: int) -> Path:
    """The run seed draws the world: its training scenes and its test combos (the tuning
    combos are the same for every seed, demo/shapes_world.py)."""
    from demo.shapes_world import WorldConfig, generate_world

    config = WorldConfig(n_images=size.world_images, n_heldout=size.heldout,
                         n_tuning=size.tuning, seed=seed)
    return generate_world(config, out, base_url)


def heldout_urls(urls: Path) -> Path:
    """The world's held-out rows as their own URL list (validation and evaluation)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(urls)
    path = urls.with_name("heldout_urls.parquet")
    pq.write_table(table.filter(pc.field("is_heldout")), path)
    return path


def curate_sections(run_dir: Path, models: Path, urls: Path, stages: list[str]) -> dict:
    from ray_jobs.curate import SCHEMA

    overrides = [
        f"--run.out_dir={json.dumps(str(run_dir))}",
        f"--run.urls={json.dumps(str(urls))}",
        f"--run.stages={json.dumps(stages)}",
        f"--score.model={json.dumps(str(models / 'open_clip'))}",
        f"--caption.model={json.dumps(str(models / 'captioner'))}",
        f"--encode.model={json.dumps(str(models / 'sd3'))}",
        # The tiny VLM has random weights: long generations only cost time.
        "--caption.generation.max_new_tokens=16",
        # Random-weight CLIP embeddings cannot tell scenes apart, so no semantic dedup here;
        # and no perceptual dedup either: checked against the world's planted copies
        # (demo/dedup_truth.py, seed-0 world), pHash at 64 px drops distinct same-colour
        # scenes of another shape or size. At 2 bits 193 drops, 27 of them copies (precision
        # 14%, recall 36%); even 6 bits with a 0.999 colour check dropped 2 distinct images.
        # Exact dedup drops none and leaves the 75 planted copies (5%) in.
        "--dedup.semantic=false",
        "--dedup.perceptual=false",
        # The world's images are 64 px: DataComp's 200 px minimum would drop them all.
        "--select.min_side=32",
        # The demo trains on original captions, so a rejected synthetic caption (the tiny VLM
        # is random) must not cost the sample.
        "--encode.synthetic_fallback=true",
        # One 64x64 bucket area: 16x16 latents with the demo's downsample-4 autoencoder.
        "--encode.bucket.resolution=64",
        "--encode.bucket.multiple=16",
        # The world's captions are at most 16 CLIP and 22 T5 tokens: 24 + 24 text tokens
        # instead of 77 + 77 make each MMDiT step about 1.6x faster (with 64 image tokens).
        "--encode.clip_max_length=24",
        "--encode.t5_max_length=24",
    ]
    return load_config(SCHEMA, CONFIGS / "curate_demo.toml", overrides)


def train_vae(run_dir: Path, models: Path, size: DemoSize):
    from demo.autoencoder_recipe import train_world_autoencoder

    return train_world_autoencoder(run_dir / "download", models / "sd3" / "vae",
                                   size.vae_steps, size.vae_seconds)


def train_mmdit(out: Path, size: DemoSize) -> Path:
    from train.config import load_train_config
    from train.trainer import Trainer

    dataset = out / "run" / "encode"
    overrides = [
        f"--run.output_dir={json.dumps(str(out / 'train'))}",
        f"--run.max_steps={size.train_steps}",
        f"--data.path={json.dumps(str(dataset))}",
        f"--checkpoint.every={size.checkpoint_every}",
        f"--checkpoint.keep_last={size.train_steps // size.checkpoint_every + 1}",
        f"--validation.path={json.dumps(str(out / 'heldout' / 'encode'))}",
        f"--validation.every={size.checkpoint_every}",
    ]
    sections = load_train_config(str(CONFIGS / "train_demo.toml"), overrides)
    Trainer(sections).fit()
    return out / "train"


def _stop_embedded_ray() -> None:
    """Curation is done: the embedded Ray's idle workers and actors would only take memory
    and CPU time from training on the same two cores."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_demo(out: Path, quick: bool, seed: int = 0) -> Path:
    from demo.evaluate import evaluate_checkpoints
    from demo.gather import gather_report
    from model.tiny import make_tiny_bundle
    from pipeline.download.local_server import LocalImageServer
    from ray_jobs.curate import curate

    size = QUICK if quick else FULL
    began = _step("tiny models (random weights, offline)")
    models = make_tiny_bundle(out / "models", seed=0)
    (out / "world").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with LocalImageServer(out / "world") as server:
        t = _step(f"shapes world: {size.world_images} images served at {server.base_url}")
        urls = make_world(out / "world", size, server.base_url, seed)
        t = _step("curation: download, score, select, dedup, caption (embedded Ray)")
        curate(curate_sections(out / "run", models, urls.with_name("train_urls.parquet"),
                               ["download", "score", "select", "dedup", "caption"]))
        timings["curation"] = time.monotonic() - t
        t = _step("autoencoder: 16 latent channels, replacing the tiny random VAE")
        vae = train_vae(out / "run", models, size)
        timings["autoencoder"] = time.monotonic() - t
        t = _step("encode: latents + CLIP-L/G + T5 embeddings into training shards")
        curate(curate_sections(out / "run", models, urls.with_name("train_urls.parquet"),
                               ["encode"]))
        # The held-out prompts' images become the validation set (SD3's validation loss).
        curate(curate_sections(out / "heldout", models, heldout_urls(urls),
                               ["download", "encode"]))
        timings["encode"] = time.monotonic() - t
    _stop_embedded_ray()
    t = _step(f"train: MMDiT, {size.train_steps} steps")
    train_dir = train_mmdit(out, size)
    timings["train"] = time.monotonic() - t
    t = _step("evaluate: held-out prompts, untrained vs trained, adherence detector")
    evaluation = evaluate_checkpoints(train_dir, models / "sd3", urls, size.sample_steps)
    timings["evaluate"] = time.monotonic() - t
    timings["total"] = time.monotonic() - began
    report = gather_report(out, vae, evaluation, timings, quick, seed)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rectiflow demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small world and a short run")
    parser.add_argument("--out", default=None, help="output folder (default runs/demo[-quick])")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed: draws the world and its test prompts (default 0)")
    args = parser.parse_args(argv)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    report = run_demo(out, args.quick, args.seed)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
