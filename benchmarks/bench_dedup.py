"""Semantic dedup benchmark: sd3 vs multiprobe on clustered embeddings with planted pairs.

    python benchmarks/bench_dedup.py --n 1000000 --out runs/bench_dedup

Data: n unit vectors (float16, 512-d) drawn from a mixture of topics on the sphere (intra-topic
cosine 0.3-0.6, so unrelated vectors stay far below the threshold); `--copies` of them are
replaced by near-duplicates of other rows at cosine 0.96-0.99, at random positions. k-means
cuts through the topics, so many planted pairs straddle a cluster border.

Each mode runs in a fresh process (wall time, CPU time and peak RSS (VmHWM) are its own; the
memory-mapped float16 array counts once it is read). Ground truth:
- every planted pair, its cosine recomputed exactly;
- brute force (exact flat inner-product range search) of `--gt-queries` random rows against
  all n rows, which catches true pairs nobody planted; a full n x n brute force would take
  about an hour on 2 cores.
Precision: every reported pair's cosine is recomputed in float32 from the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedup.config import DedupConfig  # noqa: E402
from dedup.kernels import as_float32  # noqa: E402
from dedup.pairs import Pairs  # noqa: E402
from dedup.semantic import SemanticDeduplicator  # noqa: E402


def generate(n: int, dim: int, topics: int, copies: int, seed: int, chunk: int = 100_000):
    """Clustered unit vectors (float16) and planted (original, copy) row pairs."""
    rng = np.random.default_rng(seed)
    # Topics nest in super-topics, so k-means borders cut through dense regions (as in CLIP
    # space) instead of running through empty space between well separated blobs.
    supers = _unit(rng.standard_normal((max(1, topics // 40), dim), dtype=np.float32))
    centres = _unit(supers[rng.integers(0, len(supers), topics)] + 0.8 * _noise(rng, topics, dim))
    spread = rng.uniform(0.8, 1.5, topics).astype(np.float32)  # per-topic noise scale
    vectors = np.empty((n, dim), np.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        topic = rng.integers(0, topics, m)
        vectors[start : start + m] = _unit(
            centres[topic] + spread[topic, None] * _noise(rng, m, dim)
        )
    rows = rng.permutation(n)[: 2 * copies]
    originals, copy_rows = rows[:copies], rows[copies:]
    x = vectors[originals].astype(np.float32)
    # An edit (crop, recolour) moves an embedding along the data, towards other content, more
    # than in a random direction: most of each offset points at another random row.
    towards = _unit(vectors[rng.integers(0, n, copies)].astype(np.float32) - x)
    direction = _unit(towards + 0.3 * _unit(_noise(rng, copies, dim)))
    cosine = rng.uniform(0.96, 0.99, copies).astype(np.float32)
    # Offset length t that leaves cosine(x, x + t u) = c for a unit u orthogonal-ish to x.
    direction -= np.einsum("ij,ij->i", direction, x)[:, None] * x
    direction = _unit(direction)
    offset = np.sqrt(1.0 / cosine**2 - 1.0)
    vectors[copy_rows] = _unit(x + offset[:, None] * direction)
    return vectors, np.stack([originals, copy_rows], axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _noise(rng: np.random.Generator, m: int, dim: int) -> np.ndarray:
    return rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)


def pair_cosines(vectors: np.ndarray, i: np.ndarray, j: np.ndarray, chunk=200_000) -> np.ndarray:
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a, b = as_float32(vectors, i[s : s + chunk]), as_float32(vectors, j[s : s + chunk])
        out[s : s + chunk] = np.einsum("ij,ij->i", a, b)
    return out


def brute_force(vectors: np.ndarray, queries: np.ndarray, threshold: float, chunk=131072):
    """All pairs (query, any row) at >= threshold: exact flat search over database chunks."""
    q = as_float32(vectors, queries)
    parts = []
    for start in range(0, len(vectors), chunk):
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(as_float32(vectors, slice(start, start + chunk)))
        lims, sims, ids = index.range_search(q, threshold)
        rows = np.repeat(queries, np.diff(lims).astype(np.int64))
        parts.append(Pairs.from_directed(rows, ids + start, sims))
    return Pairs.concat(parts)


def run_mode(args) -> None:
    """Child process: one mode, timed from loading the float16 array to the final pairs."""
    start = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_start = usage.ru_utime + usage.ru_stime
    vectors = np.load(Path(args.out) / "vectors.npy", mmap_mode="r")
    mode, kernel = args.mode.split(":")
    config = DedupConfig(
        semantic_mode=mode, search_kernel=kernel, semantic_threshold=args.threshold,
        num_threads=args.threads, max_probes=args.max_probes, probe_fraction=args.probe_fraction,
        routing_dim=args.routing_dim or None, n_clusters=args.n_clusters,
    )  # fmt: skip
    pairs = SemanticDeduplicator(config).find_pairs(vectors)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_gb = peak_rss_kb() / 2**20
    # CPU seconds: on a shared machine wall time stretches, CPU time much less.
    cpu = usage.ru_utime + usage.ru_stime - cpu_at_start
    np.savez(Path(args.out) / f"pairs_{mode}_{kernel}.npz", i=pairs.i, j=pairs.j, sim=pairs.sim)
    result = {"mode": args.mode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    print(json.dumps({**result, "peak_gb": round(peak_gb, 2), "load_avg": os.getloadavg()[0]}))


def peak_rss_kb() -> int:
    """This process's peak resident memory. (ru_maxrss is no use in a child: Linux carries the
    parent's peak over fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def evaluate(vectors, planted, sampled, gt_sampled: Pairs, found: Pairs, threshold) -> dict:
    planted_cos = pair_cosines(vectors, planted[:, 0], planted[:, 1])
    truth_planted = Pairs.from_directed(planted[:, 0], planted[:, 1], planted_cos)
    truth_planted = truth_planted.at_least(threshold).as_set()
    found_set = found.as_set()
    exact = pair_cosines(vectors, found.i, found.j)
    in_sample = np.isin(found.i, sampled) | np.isin(found.j, sampled)
    found_sampled = Pairs(found.i[in_sample], found.j[in_sample], found.sim[in_sample]).as_set()
    gt_set = gt_sampled.as_set()
    return {
        "pairs_found": len(found),
        "recall_planted": len(truth_planted & found_set) / max(1, len(truth_planted)),
        "recall_bruteforce_sample": len(gt_set & found_sampled) / max(1, len(gt_set)),
        "precision_exact_cosine": float((exact >= threshold - 1e-6).mean()) if len(exact) else 1.0,
        "precision_bruteforce_sample": len(gt_set & found_sampled) / max(1, len(found_sampled)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "run-mode"])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--copies", type=int, default=50_000)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--gt-queries", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-probes", type=int, default=DedupConfig.max_probes)
    parser.add_argument("--probe-fraction", type=float, default=DedupConfig.probe_fraction)
    parser.add_argument("--routing-dim", type=int, default=DedupConfig.routing_dim, help="0: full")
    parser.add_argument("--n-clusters", type=int, default=None, help="default: the mode's own")
    parser.add_argument("--modes", default="sd3:faiss,multiprobe:faiss,multiprobe:bf16")
    parser.add_argument("--mode", default="multiprobe:faiss", help="semantic_mode:search_kernel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_dedup")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    if args.command == "run-mode":
        return run_mode(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vectors, planted = generate(args.n, args.dim, args.topics, args.copies, args.seed)
    np.save(out / "vectors.npy", vectors)
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "run-mode", "--mode", mode] + _passthrough(args)
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(line.strip().splitlines()[-1]))
    sampled = np.random.default_rng(args.seed + 1).choice(args.n, args.gt_queries, replace=False)
    t = time.perf_counter()
    gt = brute_force(vectors, sampled, args.threshold)
    print(f"brute force of {args.gt_queries} queries: {time.perf_counter() - t:.1f}s")
    for result in results:
        data = np.load(out / f"pairs_{result['mode'].replace(':', '_')}.npz")
        found = Pairs(data["i"], data["j"], data["sim"])
        result.update(evaluate(vectors, planted, sampled, gt, found, args.threshold))
        print(json.dumps(result))
    (out / "results.json").write_text(json.dumps(results, indent=1))


def _passthrough(args) -> list[str]:
    return [
        "--out", args.out, "--threshold", str(args.threshold), "--threads", str(args.threads),
        "--max-probes", str(args.max_probes), "--probe-fraction", str(args.probe_fraction),
        "--routing-dim", str(args.routing_dim or 0),
    ] + (["--n-clusters", str(args.n_clusters)] if args.n_clusters else [])  # fmt: skip


if __name__ == "__main__":
    main()
