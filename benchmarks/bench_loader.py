"""Trainer data loading (issue 7): how fast the shard loader delivers batches, against how fast
the trainer consumes them, and the fraction of training time spent waiting for data.

Writes a dataset with SD3's real per-sample sizes (16 x 32 x 32 latents = 256^2 px; CLIP-L 768,
CLIP-G 1280, T5 4096 x 77 tokens; two caption variants, fp16), then
  1. loader alone: samples/s through the full decode path (variant choice, encoder dropout,
     context assembly, collation), no model, for each --workers value;
  2. trainer: a short CPU run of an MMDiT preset on the same shards, reporting the trainer's
     own samples/s and data-wait fraction (from its metrics.jsonl).

    python benchmarks/bench_loader.py --out /tmp/bench_loader
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from shard_factory import DatasetSpec, TinyDims, write_dataset  # noqa: E402

from train.config import DataConfig, load_train_config  # noqa: E402
from train.data import ShardBatches, make_loader  # noqa: E402

SD3_DIMS = TinyDims(clip_l=768, clip_g=1280, t5=4096, clip_len=77, t5_len=77)


def write_sd3_sized_dataset(out: Path, samples: int, shards: int, resolution: int) -> Path:
    dataset = out / "data"
    if not (dataset / "dataset.json").exists():
        per_shard = [samples // shards] * shards
        write_dataset(dataset, DatasetSpec(samples_per_shard=per_shard, dims=SD3_DIMS,
                                           buckets=[(resolution, resolution)]))
    return dataset


def loader_throughput(dataset: Path, batch_size: int, workers: int, batches: int) -> float:
    config = DataConfig(path=str(dataset), batch_size=batch_size, num_workers=workers)
    iterator = iter(make_loader(ShardBatches(config)))
    next(iterator)  # worker start-up is paid once per run, not per batch
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def trainer_run(dataset: Path, out: Path, preset: str, steps: int, batch_size: int,
                workers: int, precision: str) -> dict:
    from train.trainer import Trainer

    run_dir = out / f"run-{preset}-{precision}-w{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sections = load_train_config(None, [
        f"--data.path={dataset}", f"--data.batch_size={batch_size}", f"--data.num_workers={workers}",
        f"--model.preset={preset}", f"--run.output_dir={run_dir}", f"--run.max_steps={steps + 2}",
        "--run.cpu=true", f"--optim.mixed_precision={precision}", "--checkpoint.every=100000",
        "--logging.every=2", "--logging.tensorboard=false", "--checkpoint.keep_last=1",
    ])
    Trainer(sections).fit()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [x for x in lines if x["step"] > 2]  # the first interval includes warm-up
    samples = 2 * batch_size * len(measured)  # each interval holds 2 steps
    seconds = sum(2 * batch_size / x["perf/samples_per_s"] for x in measured)
    wait = sum(x["perf/data_wait_fraction"] * 2 * batch_size / x["perf/samples_per_s"]
               for x in measured)
    return {"samples_per_s": samples / seconds, "data_wait_fraction": wait / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_loader")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="d2")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--train-workers", type=int, default=1)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    out = Path(args.out)
    dataset = write_sd3_sized_dataset(out, args.samples, args.shards, args.resolution)
    print(f"torch threads {torch.get_num_threads()}; dataset {dataset}")
    for workers in args.workers:
        rate = loader_throughput(dataset, args.batch_size, workers, args.batches)
        print(f"loader  workers={workers}: {rate:8.1f} samples/s")
    result = trainer_run(dataset, out, args.preset, args.train_steps, args.batch_size,
                         args.train_workers, args.precision)
    print(f"trainer {args.preset} {args.precision} workers={args.train_workers}: "
          f"{result['samples_per_s']:8.2f} samples/s, data wait {100 * result['data_wait_fraction']:.2f}%")


if __name__ == "__main__":
    main()
