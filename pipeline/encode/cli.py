"""`rectiflow encode RUN_DIR [--config preset.toml] [--encode.key=value ...]`."""

from __future__ import annotations

import argparse
import json

from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.encode.stage import EncodeConfig, run_encode

SCHEMA = {"encode": EncodeConfig}


def main(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rectiflow encode",
        description="Precompute SD3 training shards (VAE latents, CLIP-L/G and T5 embeddings "
        "per caption variant) for the kept samples of a run, into RUN_DIR/encode/. Settings come "
        "from the [encode] table of --config and --encode.key=value overrides, e.g. "
        "--encode.model=SD3_DIR --encode.bucket.resolution=1024 --encode.runner.backend=ray.",
    )
    parser.add_argument("run_dir", help="run directory holding download/ (and select/, dedup/, caption/)")
    parser.add_argument("--config", help="TOML preset with an [encode] table")
    args = parser.parse_args(rest)
    try:
        config = load_config(SCHEMA, args.config, overrides)["encode"]
        write_resolved_config(f"{args.run_dir}/encode", {"encode": config})
        manifest = run_encode(config, args.run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rectiflow encode: {e}")
        return 2
    print(json.dumps({"counts": manifest.counts, "shards": len(manifest.shards)}, indent=1))
    return 0
