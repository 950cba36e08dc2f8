"""`rectiflow caption RUN_DIR [--config preset.toml] [--caption.key=value ...]`."""

from __future__ import annotations

import argparse
import json

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.core.manifest import stage_stats

SCHEMA = {"caption": CaptionConfig}


def main(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rectiflow caption",
        description="Recaption the kept samples of a run with a VLM (RUN_DIR/caption/). "
        "Settings come from the [caption] table of --config and --caption.key=value overrides, "
        "e.g. --caption.model=DIR --caption.runner.backend=ray --caption.runner.num_gpus=0.5.",
    )
    parser.add_argument("run_dir", help="run directory holding download/ (and select/, dedup/)")
    parser.add_argument("--config", help="TOML preset with a [caption] table")
    args = parser.parse_args(rest)
    try:
        config = load_config(SCHEMA, args.config, overrides)["caption"]
        write_resolved_config(f"{args.run_dir}/caption", {"caption": config})
        run_caption(config, args.run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rectiflow caption: {e}")
        return 2
    print(json.dumps(stage_stats(f"{args.run_dir}/caption"), indent=1))
    return 0
