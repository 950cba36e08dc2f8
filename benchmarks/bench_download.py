"""Download-and-resize throughput: rectiflow's download stage vs plain img2dataset.

Both download the same URL list from the same local server (a separate process on
127.0.0.1 serving scikit-image photos re-encoded at --photo-size), with the same process and
thread counts, shard size, and resize (shorter side to --image-size, only if bigger), in one
run, alternating tools for --repeats rounds; the best round of each is compared.

    .venv/bin/python benchmarks/bench_download.py --n 2000 --processes 2 --threads 32
    .venv/bin/python benchmarks/bench_download.py --memory --n 500   # peak RSS at n and 10n

rectiflow does more per sample than img2dataset here (keeps the original bytes as well as
the resized copy, header checks, address policy, total deadline); the goal is >= 0.95 of
img2dataset's samples per second.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def write_photos(root: Path, size: int) -> list[str]:
    """Photos re-encoded as JPEG with the longer side `size` (web-photo sized)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for name in PHOTOS:
        array = getattr(data, name)()
        if array.dtype != np.uint8:
            array = (array / array.max() * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        scale = size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        (root / f"{name}.jpg").write_bytes(out.getvalue())
        names.append(f"{name}.jpg")
    return names


def write_url_list(path: Path, base: str, names: list[str], n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base}/{names[i % len(names)]}?i={i}" for i in range(n)]  # distinct URLs
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(n)]}), path)
    return path


def start_server(root: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "pipeline.download.local_server", str(root),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE)
    server.stdout.readline()  # "serving ..." once it listens
    return server


def run_img2dataset(urls: Path, out: Path, args) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), processes_count=args.processes,
             thread_count=args.threads, number_sample_per_shard=args.rows_per_shard,
             image_size=args.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
             timeout=10, enable_wandb=False, distributor="multiprocessing")
    return time.perf_counter() - start


def run_rectiflow(urls: Path, out: Path, args) -> float:
    from pipeline.core.decode import DecodeConfig
    from pipeline.core.runners import RunnerConfig
    from pipeline.download.fetch import FetchConfig
    from pipeline.download.stage import DownloadConfig, run_download

    config = DownloadConfig(
        rows_per_shard=args.rows_per_shard, thread_count=args.threads,
        processes_count=args.processes, fetch=FetchConfig(allow_loopback=True, timeout_s=10),
        decode=DecodeConfig(image_size=args.image_size, resize_mode="keep_ratio"))
    start = time.perf_counter()
    run_download(config, RunnerConfig(), urls, out)
    return time.perf_counter() - start


def count_successes(out: Path, tool: str) -> int:
    import pyarrow.parquet as pq

    if tool == "img2dataset":
        files = list(out.glob("*.parquet"))
        return sum(pq.read_table(f, columns=["status"]).column("status").to_pylist().count("success")
                   for f in files)
    files = list((out / "download").glob("*.parquet"))
    return sum(pq.read_table(f, columns=["download_status"]).column(0).to_pylist().count("success")
               for f in files)


def throughput(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_download_"))
    write_photos(work / "site", args.photo_size)
    server = start_server(work / "site", args.port)
    try:
        base = f"http://127.0.0.1:{args.port}"
        urllib.request.urlopen(f"{base}/{PHOTOS[0]}.jpg").read()  # server is up
        urls = write_url_list(work / "urls.parquet", base, [f"{p}.jpg" for p in PHOTOS], args.n)
        results: dict[str, list[float]] = {"img2dataset": [], "rectiflow": []}
        for round_ in range(args.repeats):
            for tool, run in (("img2dataset", run_img2dataset), ("rectiflow", run_rectiflow)):
                out = work / f"{tool}_{round_}"
                seconds = run(urls, out, args)
                ok = count_successes(out, tool)
                assert ok == args.n, f"{tool}: only {ok}/{args.n} succeeded"
                results[tool].append(args.n / seconds)
                print(f"round {round_} {tool}: {args.n / seconds:.1f} samples/s", flush=True)
                shutil.rmtree(out)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    best = {tool: max(rates) for tool, rates in results.items()}
    return {"n": args.n, "processes": args.processes, "threads": args.threads,
            "photo_size": args.photo_size, "image_size": args.image_size, "rounds": results,
            "best": best, "ratio": best["rectiflow"] / best["img2dataset"]}


def peak_rss_mb(n: int, args) -> float:
    """Peak RSS of an in-process download of n URLs, measured in a fresh process."""
    code = (
        f"import sys, resource, json; sys.path.insert(0, {str(REPO)!r})\n"
        "from benchmarks.bench_download import run_rectiflow\n"
        "import argparse, pathlib\n"
        "a = argparse.Namespace(**json.loads(sys.argv[1]))\n"
        "run_rectiflow(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), a)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    work = Path(tempfile.mkdtemp(prefix="bench_download_mem_"))
    write_photos(work / "site", args.photo_size)
    server = start_server(work / "site", args.port)
    try:
        urls = write_url_list(work / "urls.parquet", f"http://127.0.0.1:{args.port}",
                              [f"{p}.jpg" for p in PHOTOS], n)
        options = {**vars(args), "processes": 0}
        result = subprocess.run([sys.executable, "-c", code, json.dumps(options), str(urls),
                                 str(work / "out")], cwd=REPO, capture_output=True, text=True,
                                check=True)
        return float(result.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--photo-size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--memory", action="store_true", help="peak RSS at n and 10 n instead")
    args = parser.parse_args()
    if args.memory:
        small, large = peak_rss_mb(args.n, args), peak_rss_mb(10 * args.n, args)
        report = {"n": args.n, "peak_rss_mb": {args.n: small, 10 * args.n: large},
                  "growth": large / small}
    else:
        report = throughput(args)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
