"""`rectiflow dedup`: deduplicate the score stage's tables of a run.

rectiflow dedup runs/x [--config preset.toml] [--dedup.semantic_mode=sd3] [--force]
rectiflow dedup --input tables/ --out dedup/ [...]     # any folder of Parquet tables
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import tomli_w

from dedup.config import DedupConfig
from dedup.stage import STAGE, run_dedup, run_dedup_for_run
from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config


def main(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rectiflow dedup",
        description="Exact (sha256), perceptual (pHash) and semantic (faiss) dedup of a run's "
        "score tables. Options: any --dedup.<key>=<value> of the [dedup] config section.",
    )
    parser.add_argument(
        "run_dir", nargs="?", type=Path,
        help="run directory: reads score/, download/ and select/, writes dedup/",
    )  # fmt: skip
    parser.add_argument("--input", type=Path, help="instead of a run: a folder of Parquet tables")
    parser.add_argument("--out", type=Path, help="with --input: the output folder")
    parser.add_argument("--config", type=Path, help="TOML preset; only its [dedup] table is used")
    parser.add_argument("--force", action="store_true", help="redo even if outputs are current")
    args = parser.parse_args(rest)
    if (args.run_dir is None) == (args.input is None) or (args.input is None) != (args.out is None):
        parser.error("give either RUN_DIR, or --input and --out")
    try:
        config = load_dedup_config(args.config, overrides)
    except ConfigError as e:
        print(f"rectiflow dedup: {e}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / STAGE
    write_resolved_config(out, {"dedup": config})
    if args.run_dir is not None:
        result = run_dedup_for_run(config, args.run_dir, force=args.force)
    else:
        result = run_dedup(config, args.input, out, force=args.force)
    m = result.manifest
    verb = "deduplicated" if result.ran else "already done (config and inputs unchanged):"
    print(f"{verb} {m.rows_in} rows -> {m.rows_out} kept; dropped {m.reasons}; out: {out}")
    return 0


def load_dedup_config(path: Path | None, overrides: list[str]) -> DedupConfig:
    """The [dedup] table of a (possibly whole-run) preset, then the command-line overrides."""
    preset: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                preset = tomllib.load(f).get("dedup", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
    # A preset's values go through the same checks as overrides, and overrides win.
    from_preset = [_as_override(key, value) for key, value in preset.items()]
    return load_config({"dedup": DedupConfig}, None, from_preset + overrides)["dedup"]


def _as_override(key: str, value) -> str:
    text = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
    return f"--dedup.{key}={text}"
