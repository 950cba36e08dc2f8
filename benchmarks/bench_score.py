"""Score stage benchmarks: throughput against the bare open_clip forward, and peak memory.

1. Throughput: the whole stage (read shard, decode each JPEG once in draft mode, preprocess,
   tokenize, image + text forward, heads, write Parquet) against the bare forward
   (`encode_image` + `encode_text` on ready-made tensors) at the same batch size. The
   stage has to compute both embeddings, so that pair is the floor. Goal: ratio >= 0.9.
2. Memory: peak RSS of a fresh process scoring N and 10 N samples. Goal: flat (streaming).

    .venv/bin/python benchmarks/bench_score.py --model ViT-B-32 --samples 256 --batch 32
    .venv/bin/python benchmarks/bench_score.py --skip-throughput --memory-sizes 200 2000

Weights do not change the cost of a forward, so `--pretrained` defaults to none (random
init; nothing is downloaded). `--device cuda --precision fp16` for a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import peak_rss_mb, write_run  # noqa: E402

from pipeline.core.stage import run_shard  # noqa: E402
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards  # noqa: E402


def _config(args, model: str) -> ScoreConfig:
    pretrained = None if args.pretrained == "none" else args.pretrained
    return ScoreConfig(model=model, pretrained=pretrained, device=args.device,
                       precision=args.precision, batch_size=args.batch,
                       decode_threads=args.decode_threads)


def bare_forward_rate(stage: ClipScorer, samples: int, batch: int) -> float:
    """Images per second of encode_image + encode_text alone, on ready-made tensors."""
    clip, device = stage.clip, stage.config.device
    size = clip.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)  # (B, 3, S, S)
    tokens = clip.tokenizer([f"a photo number {i}" for i in range(batch)]).to(device)  # (B, L)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(stage.config.precision)
    batches = max(samples // batch, 1)

    def step():
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype,
                                                    enabled=dtype is not None):
            image, text = clip.model.encode_image(pixels), clip.model.encode_text(tokens)
        return image.float().cpu(), text.float().cpu()  # the stage also brings them back

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch / (time.perf_counter() - start)


def stage_rate(stage: ClipScorer, run_dir: Path, out: Path) -> float:
    shards = score_shards(run_dir / "download")
    start = time.perf_counter()
    rows = sum(run_shard(stage, shard, out)[0].rows_in for shard in shards)
    return rows / (time.perf_counter() - start)


def throughput(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        run_dir = Path(tmp)
        write_run(run_dir, args.samples, args.per_shard, tuple(args.size))
        stage = ClipScorer(_config(args, args.model))
        stage.setup()
        bare, scored = [], []
        for round_ in range(args.repeats):  # alternate, so load changes hit both alike
            bare.append(bare_forward_rate(stage, args.samples, args.batch))
            scored.append(stage_rate(stage, run_dir, run_dir / f"score_{round_}"))
        best_bare, best_stage = max(bare), max(scored)
        return {"model": args.model, "device": args.device, "precision": args.precision,
                "batch": args.batch, "samples": args.samples, "image_size": args.size,
                "bare_forward_per_s": round(best_bare, 2), "stage_per_s": round(best_stage, 2),
                "ratio": round(best_stage / best_bare, 3),
                "rounds": {"bare": [round(x, 2) for x in bare], "stage": [round(x, 2) for x in scored]}}


def memory(args) -> dict:
    """Peak RSS of a fresh process per input size (the run is written by this process)."""
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench_score_mem_") as tmp:
        for n in args.memory_sizes:
            run_dir = Path(tmp) / f"n{n}"
            write_run(run_dir, n, args.per_shard, tuple(args.memory_image_size))
            cmd = [sys.executable, __file__, "--memory-child", str(run_dir),
                   "--model", args.memory_model, "--pretrained", "none", "--batch", str(args.batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[n] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    sizes = sorted(peaks)
    return {"model": args.memory_model, "peak_rss_mb": peaks,
            "growth": round(peaks[sizes[-1]] / peaks[sizes[0]], 3)}


def memory_child(args) -> None:
    stage = ClipScorer(_config(args, args.model))
    stage.setup()
    run_dir = Path(args.memory_child)
    rows = sum(run_shard(stage, s, run_dir / "score")[0].rows_in
               for s in score_shards(run_dir / "download"))
    print(json.dumps({"rows": rows, "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decode-threads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 768], help="JPEG width height")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--memory-model", default="ViT-B-32")
    parser.add_argument("--memory-image-size", type=int, nargs=2, default=[512, 384])
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if not args.skip_throughput:
        print(json.dumps({"throughput": throughput(args)}), flush=True)
    if not args.skip_memory:
        print(json.dumps({"memory": memory(args)}), flush=True)


if __name__ == "__main__":
    main()
