"""Encode stage benchmark: throughput against the bare VAE + text-encoder forward, bytes per
sample by component, and peak memory as the input grows.

    python benchmarks/bench_encode.py                      # tiny bundle, CPU
    python benchmarks/bench_encode.py --model SD3_DIR --device cuda --resolution 1024

Ratio = stage samples/s / bare samples/s at the same batch size, with the same loaded models:
the stage runs its shards (decode, bucket, VAE, encoders, tar/Parquet/manifest writing), the
bare side runs only the forward passes on pre-decoded, pre-bucketed inputs; the two alternate
for --rounds rounds after a warm-up and the best time of each counts. Goal: >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import best_of_alternating, peak_memory_by_size, peak_rss_mb, write_run  # noqa: E402

from model.text_encoding import encode_prompts  # noqa: E402
from pipeline.core.lineage import download_shards  # noqa: E402
from pipeline.encode.buckets import BucketConfig, load_bucketed, to_vae_input  # noqa: E402
from pipeline.encode.stage import EncodeConfig, EncodeStage, run_encode  # noqa: E402

# Real SD3 widths: CLIP-L 768, CLIP-G 1280, T5-XXL 4096; 16 latent channels, downsample 8.
SD3_DIMS = {"clip_l": (77, 768), "clip_l_pooled": (768,), "clip_g": (77, 1280),
            "clip_g_pooled": (1280,), "t5": (77, 4096)}


def sd3_bytes_per_sample(resolution: int, latent_std: bool = True, variants: int = 2) -> dict:
    """fp16 bytes per sample by component for real SD3 encoders (SD3 paper: 65.5 kB VAE,
    121 kB CLIP-L, 202 kB CLIP-G, 631 kB T5 per caption at 256^2)."""
    side = resolution // 8
    out = {"vae": 16 * side * side * 2 * (2 if latent_std else 1)}
    for name, shape in SD3_DIMS.items():
        group = name.removesuffix("_pooled")
        out[group] = out.get(group, 0) + int(torch.tensor(shape).prod()) * 2 * variants
    out["total"] = sum(out.values())
    return out


def measured_bytes_per_sample(tar_path: Path) -> dict:
    """Bytes (incl. .npy and tar headers) per sample by component in a real shard."""
    sizes: dict[str, int] = defaultdict(int)
    keys = set()
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, entry = member.name.partition(".")
            keys.add(key)
            part = entry.split(".")[-2] if entry.count(".") >= 2 else entry.split(".")[0]
            group = ("vae" if part.startswith("latent") else "json" if entry == "json"
                     else part.removesuffix("_pooled"))
            sizes[group] += member.size + 512  # each member has a 512-byte header
    out = {k: round(v / len(keys)) for k, v in sorted(sizes.items())}
    out["total"] = sum(out.values())
    return out


def bare_forward(stage: EncodeStage, pixels: list[torch.Tensor], captions: list[str], batch: int):
    """The same models' forward passes alone, on pre-decoded, pre-bucketed inputs."""
    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(pixels), batch):
                x = torch.stack(pixels[i:i + batch]).to(stage.device, stage.dtype)
                dist = stage.vae.encode(x).latent_dist
                _ = dist.mean, dist.std
                encode_prompts(stage.text_encoders, captions[i:i + batch], stage.config.t5_max_length)
            if stage.device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def encode_config(args) -> EncodeConfig:
    return EncodeConfig(model=args.model, device=args.device, batch_size=args.batch_size,
                        bucket=BucketConfig(resolution=args.resolution, multiple=args.multiple))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="SD3 diffusers dir (default: tiny bundle)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--multiple", type=int, default=32)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-sizes", default="32,128")
    parser.add_argument("--memory-child", type=int, default=0)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            from model.tiny import make_tiny_bundle

            args.model = str(make_tiny_bundle(Path(tmp) / "tiny") / "sd3")
        run_dir = Path(tmp) / "run"
        if args.memory_child:
            write_run(run_dir, args.memory_child, args.per_shard, size)
            run_encode(encode_config(args), run_dir)
            print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
            return
        images = write_run(run_dir, args.samples, args.per_shard, size)
        captions = [f"a photo number b{i:07d}" for i in range(args.samples)]
        stage = EncodeStage(encode_config(args), run_dir / "encode", ["original"])
        stage.setup()
        pixels = [to_vae_input(load_bucketed(data, stage.buckets)[0]) for data in images]
        bare_forward(stage, pixels[: args.batch_size], captions, args.batch_size)()  # warm-up
        stage_s, bare_s = best_of_alternating(
            stage, download_shards(run_dir), run_dir / "encode",
            bare_forward(stage, pixels, captions, args.batch_size), args.rounds)
        tar = run_dir / "encode" / "shards" / "00000.tar"
        common = ["--model", args.model, "--device", args.device, "--batch-size",
                  str(args.batch_size), "--resolution", str(args.resolution),
                  "--per-shard", str(args.per_shard), "--image-size", args.image_size]
        result = {
            "device": str(stage.device), "samples": args.samples, "rounds": args.rounds,
            "batch_size": args.batch_size, "resolution": args.resolution,
            "stage_samples_per_s": round(args.samples / stage_s, 2),
            "bare_samples_per_s": round(args.samples / bare_s, 2),
            "ratio_stage_over_bare": round(bare_s / stage_s, 3),
            "measured_bytes_per_sample": measured_bytes_per_sample(tar),
            "sd3_bytes_per_sample_256": sd3_bytes_per_sample(256),
            "sd3_bytes_per_sample_1024": sd3_bytes_per_sample(1024),
            "peak_rss_mb_by_samples": peak_memory_by_size(
                __file__, [int(n) for n in args.memory_sizes.split(",")], common),
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
