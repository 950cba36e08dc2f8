"""The curation job: every implemented stage of a run, on a Ray cluster or an embedded Ray.

    ray job submit --working-dir . -- python -m ray_jobs.curate --config configs/curate_laion.toml \
        --run.out_dir=/shared/runs/laion_1 --run.urls=/shared/urls/laion_1.parquet
    rectiflow curate --config configs/curate_demo.toml          # starts an embedded Ray

Sections: [run] (what to run and where), [runner] (the download stage's Ray tasks, as in
`rectiflow download`), [download], [score] (with [score.runner]: its actor pool, GPUs),
[select]. Under `ray job submit` RAY_ADDRESS points at the cluster; without it an embedded
Ray starts. `--run.backend=local` runs every stage in this process instead (debugging).

This module composes stages and holds no stage logic. Every stage resumes: a rerun of the
same command skips the shards that are already done, decided from manifests before any model
loads; `--run.verify=true` also re-hashes done outputs (score, dedup, caption, encode). The
job holds the run directory's lock throughout: a second job on the same directory is refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from dedup.config import DedupConfig
from dedup.stage import run_dedup_for_run
from pipeline.core.command import EXIT_USER_ERROR, InputError
from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.core.run_lock import RunLocked, run_lock
from pipeline.core.runners import RunnerConfig, ensure_ray, run_stage
from pipeline.download.stage import DownloadConfig, run_download
from pipeline.encode.stage import EncodeConfig, run_encode
from pipeline.inspect.funnel import format_funnel, funnel
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards
from pipeline.select.stage import SelectConfig, SelectError, run_select


@dataclass
class RunConfig:
    # On a cluster use a path every node sees: `--working-dir` is a temporary copy per job.
    out_dir: str = "runs/curate"
    # URL list: a file, glob or folder of parts (.parquet/.csv/.jsonl), or a list of them,
    # local or s3:// / gs://; None: reuse download/ shards
    urls: str | list[str] | None = None
    stages: list[str] = field(default_factory=lambda: ["download", "score", "select"])
    backend: Literal["ray", "local"] = "ray"
    verify: bool = False  # done shards: re-hash outputs against the recorded sha256, not just sizes

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; implemented stages: {list(STAGES)}")


SCHEMA = {
    "run": RunConfig,
    "runner": RunnerConfig,
    "download": DownloadConfig,
    "score": ScoreConfig,
    "select": SelectConfig,
    "dedup": DedupConfig,
    "caption": CaptionConfig,
    "encode": EncodeConfig,
}


def _on(runner: RunnerConfig, run: RunConfig) -> RunnerConfig:
    """The stage's runner, on the job's backend (a Ray job runs every stage on Ray)."""
    return replace(runner, backend=run.backend)


def download_stage(sections: dict, run_dir: Path) -> None:
    run = sections["run"]
    if run.urls is None:
        if not (run_dir / "download").is_dir():
            raise ConfigError("run.urls is not set and the run has no download/ shards to reuse")
        print("download: run.urls not set, using the existing download/ shards")
        return
    run_download(sections["download"], _on(sections["runner"], run), run.urls, run_dir)


def score_stage(sections: dict, run_dir: Path) -> None:
    config: ScoreConfig = sections["score"]
    shards = score_shards(run_dir / "download")
    run_stage(lambda: ClipScorer(config), shards, run_dir / "score", _on(config.runner, sections["run"]),
              sections["run"].verify)


def select_stage(sections: dict, run_dir: Path) -> None:
    run_select(run_dir, sections["select"], verify=sections["run"].verify)


def dedup_stage(sections: dict, run_dir: Path) -> None:
    # On a Ray job the per-cluster search runs as Ray tasks too.
    run = sections["run"]
    run_dedup_for_run(replace(sections["dedup"], backend=run.backend), run_dir, verify=run.verify)


def caption_stage(sections: dict, run_dir: Path) -> None:
    config: CaptionConfig = sections["caption"]
    run_caption(config, run_dir, _on(config.runner, sections["run"]), sections["run"].verify)


def encode_stage(sections: dict, run_dir: Path) -> None:
    config: EncodeConfig = sections["encode"]
    run_encode(config, run_dir, _on(config.runner, sections["run"]), sections["run"].verify)


# Stages in funnel order.
STAGES: dict[str, Callable[[dict, Path], None]] = {
    "download": download_stage,
    "score": score_stage,
    "select": select_stage,
    "dedup": dedup_stage,
    "caption": caption_stage,
    "encode": encode_stage,
}


def curate(sections: dict) -> Path:
    """Run the configured stages in funnel order; return the run directory."""
    run: RunConfig = sections["run"]
    run_dir = Path(run.out_dir).resolve()
    with run_lock(run_dir):  # before anything is written or a stale temporary deleted
        write_resolved_config(run_dir, sections)
        if run.backend == "ray":
            ensure_ray(sections["runner"].ray_address)
        for name in (s for s in STAGES if s in run.stages):
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            STAGES[name](sections, run_dir)
            print(f"== {name} done in {time.perf_counter() - start:.1f} s", flush=True)
    return run_dir


def main(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rectiflow curate",
        description="Run download, score and select for one run directory, on Ray "
        "(RAY_ADDRESS or an embedded Ray). Override any setting with --section.key=value.",
    )
    parser.add_argument("--config", required=True, help="TOML preset, e.g. configs/curate_demo.toml")
    args = parser.parse_args(rest)
    try:
        sections = load_config(SCHEMA, args.config, overrides)
        run_dir = curate(sections)
    except (ConfigError, InputError, SelectError, RunLocked) as e:
        print(f"rectiflow curate: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"\nrun directory: {run_dir}\n{format_funnel(funnel(run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
