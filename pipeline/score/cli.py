"""`rectiflow score RUN_DIR`: score every downloaded image of a run (RUN_DIR/download -> score)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.core.manifest import stage_stats
from pipeline.core.runners import run_stage
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rectiflow score",
        description="Compute CLIP embeddings and scores for RUN_DIR/download into RUN_DIR/score. "
        "Settings: --config TOML ([score] table) and --score.KEY=VALUE overrides, e.g. "
        "--score.model=ViT-L-14 --score.pretrained=openai --score.runner.backend=ray.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", help="TOML preset; its [score] table is used")
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    try:
        config = load_config(
            {"score": ScoreConfig}, args.config, overrides, ignore_other_sections=True
        )["score"]
    except ConfigError as e:
        print(f"rectiflow score: {e}", file=sys.stderr)
        return 2
    shards = score_shards(args.run_dir / "download")
    if not shards:
        print(f"rectiflow score: no completed download shards in {args.run_dir / 'download'}",
              file=sys.stderr)
        return 1
    score_dir = args.run_dir / "score"
    write_resolved_config(score_dir, {"score": config})
    run_stage(lambda: ClipScorer(config), shards, score_dir, config.runner)
    stats = stage_stats(score_dir)
    print(f"scored {stats['rows_out']} of {stats['rows_in']} images in {stats['shards']} shards; "
          f"dropped: {stats['reasons'] or 'none'}; {stats['rows_per_second']} rows/s")
    return 0
