"""`rectiflow select RUN_DIR`: choose the samples to keep from the scores; nothing is deleted."""

from __future__ import annotations

import argparse
import sys

import pyarrow.parquet as pq

from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.select.stage import PRESETS, SelectConfig, SelectError, describe, run_select


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rectiflow select",
        description="Write RUN_DIR/select/kept.parquet and rules.parquet from RUN_DIR/score. "
        "Rules: --select.KEY=VALUE (nsfw_max, aesthetic_min, clip_min, clip_top_percent, "
        "min_side, max_aspect, min_caption_words, min_caption_chars, english_like).",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--config", help="TOML preset; its [select] table is used")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shorthand for --select.preset")
    args, overrides = _parse(parser, argv)
    if args.preset:
        overrides.append(f"--select.preset={args.preset}")
    try:
        config = load_config(
            {"select": SelectConfig}, args.config, overrides, ignore_other_sections=True
        )
        select = config["select"]
        manifest = run_select(args.run_dir, select)
    except (ConfigError, SelectError) as e:
        print(f"rectiflow select: {e}", file=sys.stderr)
        return 2
    write_resolved_config(f"{args.run_dir}/select", {"select": select})
    print("rules: " + ("; ".join(describe(select)) or "none (everything kept)"))
    print(f"kept {manifest.rows_out} of {manifest.rows_in} scored samples")
    rules = pq.read_table(f"{args.run_dir}/select/rules.parquet").to_pylist()
    for rule in rules:
        print(f"  {rule['rule']:<22} {rule['threshold']:<32} removed {rule['removed']:>8}"
              f"  (failed {rule['failed']})")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    rest, overrides = split_overrides(argv)
    return parser.parse_args(rest), overrides
