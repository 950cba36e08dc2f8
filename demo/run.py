"""`rectiflow demo [--quick]`: the whole system on an offline synthetic world, end to end.

1. tiny models in the real formats (`rectiflow models make-tiny`);
2. a shapes world with exact captions and web-like noise, served from 127.0.0.1;
3. the curation job on an embedded Ray: download, score, select, dedup, caption;
4. a 16-channel autoencoder trained on the downloaded images, replacing the tiny random VAE,
   then the encode stage (latents + text embeddings into training shards);
5. the MMDiT trained for a bounded number of steps, with checkpoints and validation loss;
6. held-out prompts sampled from each checkpoint and from the untrained model with the same
   seeds, read back by the adherence detector;
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
    heldout: int
    vae_seconds: float
    vae_steps: int
    train_steps: int
    checkpoint_every: int
    sample_steps: int


# The autoencoder trains a fixed 780 steps (about 105 s here; the time budget is only a cap
# for slow machines): with a 90 s budget it made 660-710 steps depending on the machine's
# speed, so its learning-rate schedule and result did too. MMDiT colour accuracy varies
# 77-98% between runs (docs/benchmarks.md); the run with the fewest autoencoder steps (660,
# 25.0 dB) gave the 77%.
FULL = DemoSize(world_images=1500, heldout=48, vae_seconds=200, vae_steps=780,
                train_steps=2800, checkpoint_every=700, sample_steps=20)
QUICK = DemoSize(world_images=200, heldout=12, vae_seconds=12, vae_steps=150,
                 train_steps=30, checkpoint_every=15, sample_steps=8)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def make_world(out: Path, size: DemoSize, base_url: str) -> Path:
    from demo.shapes_world import WorldConfig, generate_world

    config = WorldConfig(n_images=size.world_images, n_heldout=size.heldout, seed=0)
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
        # Random-weight CLIP embeddings cannot tell scenes apart, so no semantic dedup here.
        # In the 1500-image world, pHash at 2 bits (confirmed by its colour check) finds 45 of
        # the 75 planted copies (24 resized, 12 recompressed, 9 shifted) and drops 274 images;
        # 6 bits finds 56 but drops 417: at 64 px pHash cannot tell a small circle from a
        # small square, so beside copies it groups same-colour scenes of another shape, size
        # or background shade (the colour check keeps other colours apart).
        "--dedup.semantic=false",
        "--dedup.phash_max_distance=2",
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
    from train.autoencoder import AutoencoderTrainConfig, load_images, train_autoencoder

    # Downsample 4, not SD3's 8: the world's images are 64 px and its small objects 10 px, so
    # 8x8 latents would give an object about one latent pixel, and a CPU-trained autoencoder
    # then loses its colour (read back from reconstructions: 63% of hues right after 210 s at
    # 8x, 98% after 90 s at 4x; train/autoencoder.py).
    config = AutoencoderTrainConfig(time_budget_s=size.vae_seconds, steps=size.vae_steps,
                                    block_out_channels=(16, 32, 64),
                                    heldout_images=min(64, size.world_images // 8))
    images = load_images(run_dir / "download", config.image_size)
    return train_autoencoder(images, models / "sd3" / "vae", config)


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


def run_demo(out: Path, quick: bool) -> Path:
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
        urls = make_world(out / "world", size, server.base_url)
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
    report = gather_report(out, vae, evaluation, timings, quick)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rectiflow demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small world and a short run")
    parser.add_argument("--out", default=None, help="output folder (default runs/demo[-quick])")
    args = parser.parse_args(argv)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    report = run_demo(out, args.quick)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
