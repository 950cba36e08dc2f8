"""Shared helpers of the caption and encode benchmarks: a synthetic run dir and peak memory."""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.manifest import ShardManifest, shard_outputs


def photo_like(seed: int, size: tuple[int, int]) -> bytes:
    """A JPEG with smooth structure (compresses and decodes like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 255, (max(h // 64, 2), max(w // 64, 2), 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_run(run_dir: Path, samples: int, per_shard: int, size: tuple[int, int]) -> list[bytes]:
    """A download/ folder in the documented format with `samples` JPEGs; returns their bytes."""
    images = []
    for start in range(0, samples, per_shard):
        shard = f"{start // per_shard:05d}"
        uids = [f"b{i:07d}" for i in range(start, min(start + per_shard, samples))]
        manifest = ShardManifest(stage="download", shard=shard, config_hash="bench")
        with shard_outputs(run_dir / "download", manifest, []) as outputs:
            with tarfile.open(outputs.path(f"{shard}.tar"), "w") as tar:
                for i, uid in enumerate(uids):
                    data = photo_like(start + i, size)
                    images.append(data)
                    for name, payload in ((f"{uid}.jpg", data), (f"{uid}.json", b"{}")):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            table = pa.table({"uid": uids, "caption": [f"a photo number {u}" for u in uids],
                              "download_status": ["success"] * len(uids)})
            pq.write_table(table, outputs.path(f"{shard}.parquet"))
            manifest.rows_in = manifest.rows_out = len(uids)
    return images


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_memory_by_size(script: str, sizes: list[int], extra: list[str]) -> dict[int, float]:
    """Peak RSS (MB) of a fresh process running the stage over each input size."""
    peaks = {}
    for n in sizes:
        out = subprocess.run([sys.executable, script, "--memory-child", str(n), *extra],
                             check=True, capture_output=True, text=True).stdout
        peaks[n] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def best_of_alternating(stage, shards, stage_dir: Path, bare, rounds: int) -> tuple[float, float]:
    """Best (smallest) seconds of the stage over `shards` and of `bare()`, run alternately.

    The same loaded models serve both; alternating and taking the best of each keeps the
    load of other jobs on a shared machine from favouring either side.
    """
    import shutil

    from pipeline.core.stage import run_shard

    stage_times, bare_times = [], []
    for _ in range(rounds):
        shutil.rmtree(stage_dir, ignore_errors=True)
        start = time.perf_counter()
        for shard in shards:
            run_shard(stage, shard, stage_dir)
        stage_times.append(time.perf_counter() - start)
        bare_times.append(bare())
    return min(stage_times), min(bare_times)
