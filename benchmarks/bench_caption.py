"""Caption stage benchmark: throughput against the bare processor + `generate` at the same
batch size, and peak memory as the input grows.

    python benchmarks/bench_caption.py                          # tiny LLaVA, CPU
    python benchmarks/bench_caption.py --model llava-hf/llava-1.5-7b-hf --device cuda

Ratio = stage samples/s / bare samples/s at the same batch size, with the same loaded model:
the stage runs its shards (decode, processor, generate, cleaning, Parquet, manifest), the bare
side runs the processor and `generate` on pre-decoded images; the two alternate for --rounds
rounds after a warm-up and the best time of each counts. Goal: >= 0.9.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import best_of_alternating, peak_memory_by_size, peak_rss_mb, write_run  # noqa: E402

from captioning.config import CaptionConfig  # noqa: E402
from captioning.stage import CaptionStage, run_caption  # noqa: E402
from pipeline.core.lineage import download_shards  # noqa: E402


def caption_config(args) -> CaptionConfig:
    config = CaptionConfig(model=args.model, device=args.device, batch_size=args.batch_size)
    config.generation.max_new_tokens = args.max_new_tokens
    return config


def bare_generate(stage: CaptionStage, images: list[Image.Image], batch: int):
    """The same model's processor + `generate` alone, on pre-decoded images."""
    captioner = stage.captioner
    kwargs = captioner.config.generation.generate_kwargs()

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                captioner.model.generate(**captioner.inputs(images[i:i + batch]), **kwargs)
            if captioner.device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="captioner id or dir (default: tiny LLaVA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-sizes", default="16,64")
    parser.add_argument("--memory-child", type=int, default=0)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            from model.tiny import make_tiny_bundle

            args.model = str(make_tiny_bundle(Path(tmp) / "tiny") / "captioner")
        run_dir = Path(tmp) / "run"
        if args.memory_child:
            write_run(run_dir, args.memory_child, args.per_shard, size)
            run_caption(caption_config(args), run_dir)
            print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
            return
        images = write_run(run_dir, args.samples, args.per_shard, size)
        stage = CaptionStage(caption_config(args))
        stage.setup()
        decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in images]
        bare_generate(stage, decoded[: args.batch_size], args.batch_size)()  # warm-up
        stage_s, bare_s = best_of_alternating(
            stage, download_shards(run_dir), run_dir / "caption",
            bare_generate(stage, decoded, args.batch_size), args.rounds)
        common = ["--model", args.model, "--device", args.device, "--batch-size",
                  str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                  "--per-shard", str(args.per_shard), "--image-size", args.image_size]
        print(json.dumps({
            "device": str(stage.captioner.device), "samples": args.samples, "rounds": args.rounds,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "stage_samples_per_s": round(args.samples / stage_s, 2),
            "bare_samples_per_s": round(args.samples / bare_s, 2),
            "ratio_stage_over_bare": round(bare_s / stage_s, 3),
            "peak_rss_mb_by_samples": peak_memory_by_size(
                __file__, [int(n) for n in args.memory_sizes.split(",")], common),
        }, indent=1))


if __name__ == "__main__":
    main()
