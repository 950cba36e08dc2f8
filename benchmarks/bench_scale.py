"""Scale benchmark: is every stage linear in its data and incremental on change?

    python benchmarks/bench_scale.py --rows 100000,1000000 --json runs/bench_scale.json

For each size, in a fresh process (so peak RSS is that size's own), it builds a synthetic run
directory in the documented formats (real Parquet tables, real WebDataset tars of tiny PNGs,
real manifests written by the framework): download shards of `--rows-per-shard` rows (95%
successful) and score shards. Then it runs, through the same functions `rectiflow curate`
calls:
- select (thresholds plus a `clip_top_percent` cut, so the sketch path is timed);
- dedup, exact only (the one global step, reported under its own key);
- a caption-like stage: the real caption stage (kept rows joined per shard, images read from
  the tar and decoded, captions cleaned and written with provenance) with a trivial captioner;
- an encode-like stage: the real encode stage's row path (kept rows, synthetic captions,
  scores, decode and bucket placement, training-shard writer) with trivial "models";
then the same stages again with nothing changed (the no-op rerun), then once more after
rewriting ONE download shard (one sample's caption changed), counting the shards each stage
redid. Output (`--json`):

    {"stages": {NAME: {"per_row_us": {"100000": x, "1000000": y},
                       "noop_rerun_fraction": ..., "redone_after_one_shard_change": ...}},
      "dedup": {...}, "driver_peak_rss_mb": {"100000": a, "1000000": b}, "machine": {...}}

Dedup runs in a child process (its peak RSS is reported under "dedup"); the driver's peak
covers building the run, select, caption and encode. Stage modules are imported before any
timing. Select, caption and encode run in-process (`runner.backend = "local"`), so the
driver's peak includes the stages' own work: an upper bound on what a Ray driver holds.

Goals (issue 14): per-row cost at 1M <= 1.2x that at 100k for every stage; no-op rerun <= 2%
of the first run; one changed download shard redoes exactly 1 shard per downstream stage;
driver peak RSS at 1M <= 1 GB outside dedup.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.manifest import ShardManifest, shard_outputs  # noqa: E402
from pipeline.download.stage import write_results  # noqa: E402

EMBED_DIM = 8
SIDE = 16
# Every 100th sample is an exact copy of the one before it, so exact dedup has work to do.
COPY_EVERY = 100


_PATTERNS = np.random.default_rng(0).integers(0, 255, (64, SIDE, SIDE, 3), dtype=np.uint8)
_PPM_HEADER = f"P6 {SIDE} {SIDE} 255\n".encode()


def tiny_image(n: int) -> bytes:
    """Sample n's image, a 16 px binary PPM (a format download stores): noise from a small set
    of patterns, made unique by n written into its first pixels. Making and decoding it is
    cheap, so the benchmark times the framework (joins, reads, writes, manifests), which is
    what must scale; a real model's cost per row is constant and measured elsewhere."""
    if n % COPY_EVERY == COPY_EVERY - 1:
        n -= 1
    pixels = _PATTERNS[n % 64].copy()
    pixels[0, :4] = np.frombuffer(n.to_bytes(12, "big"), np.uint8).reshape(4, 3)
    return _PPM_HEADER + pixels.tobytes()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def download_rows(first: int, rows: int, caption_tag: str = "") -> list[tuple[dict, bytes]]:
    """One shard's download rows and images: 95% successes, 5% failures with a reason."""
    out = []
    for n in range(first, first + rows):
        uid = f"s{n:09d}"
        ok = n % 20 != 7
        data = tiny_image(n)
        row = {"uid": uid, "url": f"http://127.0.0.1:9/{uid}.png",
               "caption": f"a picture of thing number {n} on a plain background{caption_tag}",
               "download_status": "success" if ok else "failed",
               "download_reason": None if ok else "http_404",
               "download_retryable": False, "download_http_status": 200 if ok else 404,
               "download_width": 16 if ok else None, "download_height": 16 if ok else None,
               "download_format": "ppm" if ok else None,
               "download_bytes": len(data) if ok else None,
               "download_sha256": hashlib.sha256(data).hexdigest() if ok else None,
               "download_attempts": 1, "download_error": None, "download_retry_at": None}
        out.append((row, data))
    return out


def write_download_shard(run_dir: Path, shard_index: int, first: int, rows: int,
                         caption_tag: str = "") -> None:
    shard = f"{shard_index:05d}"
    samples = download_rows(first, rows, caption_tag)
    table_rows = [row for row, _ in samples]
    manifest = ShardManifest(stage="download", shard=shard, config_hash="bench_scale")
    with shard_outputs(run_dir / "download", manifest, []) as outputs:
        with tarfile.open(outputs.path(f"{shard}.tar"), "w", format=tarfile.PAX_FORMAT) as tar:
            for row, data in samples:
                if row["download_status"] == "success":
                    _add(tar, f"{row['uid']}.ppm", data)
                    _add(tar, f"{row['uid']}.json", b"{}")
        write_results(table_rows, outputs.path(f"{shard}.parquet"))  # the download stage's writer
        failed = sum(r["download_status"] != "success" for r in table_rows)
        manifest.rows_in, manifest.rows_out = rows, rows - failed
        manifest.reasons = {"http_404": failed} if failed else {}


def write_score_shard(run_dir: Path, shard_index: int, rows: int) -> None:
    """What the score stage writes for a download shard (CLIP scores spread over [0.1, 0.4])."""
    from pipeline.score.stage import score_schema

    shard = f"{shard_index:05d}"
    download = pq.read_table(run_dir / "download" / f"{shard}.parquet",
                             columns=["uid", "download_status", "caption"])
    ok = download.filter(pa.compute.equal(download["download_status"], "success"))
    n = ok.num_rows
    rng = np.random.default_rng(shard_index)
    emb = rng.standard_normal((n, EMBED_DIM)).astype(np.float16)
    embedding_type = pa.list_(pa.float16(), EMBED_DIM)
    flat = pa.array(emb.reshape(-1))
    captions = ok["caption"].to_pylist()
    table = pa.table({
        "uid": ok["uid"], "score_reason": pa.nulls(n, pa.string()),
        "score_width": pa.array([16] * n, pa.int32()), "score_height": pa.array([16] * n, pa.int32()),
        "score_aspect": pa.array([1.0] * n, pa.float32()),
        "score_caption_length": pa.array([len(c) for c in captions], pa.int32()),
        "score_caption_words": pa.array([len(c.split()) for c in captions], pa.int32()),
        "score_clip": pa.array(rng.uniform(0.1, 0.4, n).astype(np.float32)),
        "score_aesthetic": pa.nulls(n, pa.float32()), "score_nsfw": pa.nulls(n, pa.float32()),
        "score_image_embedding": pa.FixedSizeListArray.from_arrays(flat, EMBED_DIM).cast(embedding_type),
        "score_text_embedding": pa.FixedSizeListArray.from_arrays(flat, EMBED_DIM).cast(embedding_type),
    }, schema=score_schema(EMBED_DIM))
    manifest = ShardManifest(stage="score", shard=shard, config_hash="bench_scale")
    with shard_outputs(run_dir / "score", manifest,
                       [run_dir / "download" / f"{shard}.parquet", run_dir / "download" / f"{shard}.tar"]) as outputs:
        pq.write_table(table, outputs.path(f"{shard}.parquet"))
        manifest.rows_in = manifest.rows_out = n


def build_run(run_dir: Path, rows: int, per_shard: int) -> int:
    shards = (rows + per_shard - 1) // per_shard
    for k in range(shards):
        write_download_shard(run_dir, k, k * per_shard, min(per_shard, rows - k * per_shard))
        write_score_shard(run_dir, k, per_shard)
    return shards


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    return sorted(wanted & set(re.findall(r"[\w]+", text)))


def machine() -> dict:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {"cpu": model.group(1) if model else platform.processor(), "flags": cpu_flags(),
            "cores": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()}


# ---------------------------------------------------------------- the stages, as curate runs them

class TrivialCaptioner:
    """A captioner whose cost is nothing: the caption stage's own work is what is timed."""

    model_id = "bench-trivial"
    model_revision = "0"

    def caption(self, images):
        return [f"a small square image of {im.width} by {im.height} pixels" for im in images]


def caption_like(run_dir: Path) -> None:
    from captioning.config import CaptionConfig
    from captioning.stage import CAPTION_READS, CaptionStage
    from pipeline.core.lineage import plan_lineage
    from pipeline.core.runners import RunnerConfig, run_stage

    class BenchCaption(CaptionStage):
        def setup(self) -> None:
            self.captioner = TrivialCaptioner()

    config = CaptionConfig(model="bench-trivial", batch_size=64, decode_threads=1)
    plan = plan_lineage(run_dir, CAPTION_READS)
    run_stage(lambda: BenchCaption(config), plan.shards, run_dir / "caption", RunnerConfig())


def encode_like(run_dir: Path) -> None:
    """The encode stage's row path and writer with constant tensors for the VAE and encoders."""
    import torch

    from pipeline.core.lineage import plan_lineage
    from pipeline.core.runners import RunnerConfig, run_stage
    from pipeline.encode.buckets import BucketConfig
    from pipeline.encode.stage import ENCODE_READS, EncodeConfig, EncodeStage

    class BenchEncode(EncodeStage):
        def setup(self) -> None:
            self.device, self.dtype = torch.device("cpu"), torch.float32

        def encode_images(self, pixels):
            latents = [torch.zeros(16, p.shape[1] // 8, p.shape[2] // 8) for p in pixels]
            return latents, latents

        def encode_texts(self, captions):
            def one():
                return {"clip_l": torch.zeros(4, 8), "clip_l_pooled": torch.zeros(8),
                        "clip_g": torch.zeros(4, 8), "clip_g_pooled": torch.zeros(8),
                        "t5": torch.zeros(4, 8)}
            return [{v: one() for v in c} if isinstance(c, dict) else one() for c in captions]

    config = EncodeConfig(model="bench-trivial", bucket=BucketConfig(resolution=16, multiple=16),
                          batch_size=64, decode_threads=1)
    plan = plan_lineage(run_dir, ENCODE_READS)
    variants = ["original", "synthetic"] if (run_dir / "caption").is_dir() else ["original"]
    run_stage(lambda: BenchEncode(config, run_dir / "encode", variants), plan.shards,
              run_dir / "encode", RunnerConfig())


def select(run_dir: Path) -> None:
    from pipeline.select.stage import SelectConfig, run_select

    run_select(run_dir, SelectConfig(min_caption_words=3, clip_top_percent=90.0), progress=False)


def dedup_in_process(run_dir: Path) -> None:
    from dedup.config import DedupConfig
    from dedup.stage import run_dedup_for_run

    run_dedup_for_run(DedupConfig(perceptual=False, semantic=False, sweep=False), run_dir)


DEDUP_PEAKS: list[float] = []


def dedup(run_dir: Path) -> float:
    """Dedup in a process of its own: it is the one global step, whose memory the driver's
    peak must not include. Returns the seconds the child measured around the call itself."""
    out = subprocess.run([sys.executable, __file__, "--dedup-child", str(run_dir)], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    DEDUP_PEAKS.append(result["peak_rss_mb"])
    return result["seconds"]


STAGES = {"select": select, "caption": caption_like, "encode": encode_like}


def manifest_times(stage_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in stage_dir.glob("*.manifest.json")}


def redone(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(1 for name, t in after.items() if before.get(name) != t)


def timed(fn, run_dir: Path) -> float:
    start = time.perf_counter()
    measured = fn(run_dir)
    return measured if isinstance(measured, float) else time.perf_counter() - start


def warm_imports() -> None:
    """Import every stage before timing, so the first stage timed does not pay for them."""
    import captioning.stage  # noqa: F401
    import pipeline.encode.stage  # noqa: F401
    import pipeline.select.stage  # noqa: F401


def one_size(rows: int, per_shard: int, work: Path) -> dict:
    """Everything for one size, in this (fresh) process."""
    run_dir = work / f"run_{rows}"
    shutil.rmtree(run_dir, ignore_errors=True)
    warm_imports()
    start = time.perf_counter()
    shards = build_run(run_dir, rows, per_shard)
    result: dict = {"rows": rows, "shards": shards, "build_s": round(time.perf_counter() - start, 1),
                    "stages": {}}
    order = [("select", select), ("dedup", dedup), ("caption", caption_like), ("encode", encode_like)]
    first = {name: timed(fn, run_dir) for name, fn in order}
    noop = {name: timed(fn, run_dir) for name, fn in order}
    # One download shard changes (one caption): the score stage would redo its shard k.
    k = shards // 2
    before = {name: manifest_times(run_dir / name) for name, _ in order}
    before["dedup"] = manifest_times(run_dir / "dedup")
    write_download_shard(run_dir, k, k * per_shard, min(per_shard, rows - k * per_shard),
                         caption_tag=" (edited)")
    write_score_shard(run_dir, k, per_shard)
    changed = {name: timed(fn, run_dir) for name, fn in order}
    after = {name: manifest_times(run_dir / name) for name, _ in order}
    for name, _ in order:
        entry = {"first_s": round(first[name], 2), "per_row_us": round(first[name] / rows * 1e6, 2),
                 "noop_rerun_s": round(noop[name], 3),
                 "noop_rerun_fraction": round(noop[name] / first[name], 4),
                 "after_change_s": round(changed[name], 2),
                 "redone_after_one_shard_change": redone(before[name], after[name])}
        if name == "dedup":
            result["dedup"] = entry
        else:
            result["stages"][name] = entry
    result["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)  # build, select, caption, encode
    result["dedup"]["peak_rss_mb"] = round(max(DEDUP_PEAKS), 1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--work", default="runs/bench_scale", help="scratch folder (emptied per size)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dedup-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dedup_child is not None:
        import dedup.stage  # noqa: F401 -- imports are not the step's cost
        start = time.perf_counter()
        dedup_in_process(Path(args.dedup_child))
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.one_size is not None:
        print(json.dumps(one_size(args.one_size, args.rows_per_shard, work)))
        return 0
    sizes = [int(s) for s in args.rows.split(",")]
    per_size = {}
    for n in sizes:  # a fresh process per size: its peak RSS is that size's own
        out = subprocess.run([sys.executable, __file__, "--one-size", str(n), "--rows-per-shard",
                              str(args.rows_per_shard), "--work", str(work)],
                             check=True, capture_output=True, text=True).stdout
        per_size[n] = json.loads(out.strip().splitlines()[-1])
        print(f"{n} rows: {json.dumps(per_size[n])}", flush=True)
    report = {"stages": {}, "dedup": {}, "driver_peak_rss_mb": {}, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows_per_shard": args.rows_per_shard, "per_size": per_size}
    names = list(per_size[sizes[0]]["stages"])
    for name in names:
        report["stages"][name] = {
            "per_row_us": {str(n): per_size[n]["stages"][name]["per_row_us"] for n in sizes},
            "noop_rerun_fraction": max(per_size[n]["stages"][name]["noop_rerun_fraction"] for n in sizes),
            "redone_after_one_shard_change": max(per_size[n]["stages"][name]["redone_after_one_shard_change"]
                                                 for n in sizes),
        }
    report["dedup"] = {
        "per_row_us": {str(n): per_size[n]["dedup"]["per_row_us"] for n in sizes},
        "noop_rerun_fraction": max(per_size[n]["dedup"]["noop_rerun_fraction"] for n in sizes),
        "rerun_after_one_shard_change_s": {str(n): per_size[n]["dedup"]["after_change_s"] for n in sizes},
        "peak_rss_mb": {str(n): per_size[n]["dedup"]["peak_rss_mb"] for n in sizes},
    }
    report["driver_peak_rss_mb"] = {str(n): per_size[n]["driver_peak_rss_mb"] for n in sizes}
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
