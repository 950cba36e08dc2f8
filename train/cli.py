"""`rectiflow train --config configs/<preset>.toml [--section.key=value ...]`.

Also `python -m train ...` and `accelerate launch -m train ...` / `torchrun -m train ...`
for several processes (DDP; one reader slot per rank and data worker).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.core.command import EXIT_USER_ERROR
from pipeline.core.config import ConfigError, split_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rectiflow train",
        description="Train an MMDiT with rectified flow on precomputed SD3 training shards.",
        epilog="Any --section.key=value overrides the preset, e.g. --optim.lr=3e-4 "
               "--data.path=s3://bucket/dataset --run.max_steps=100.",
    )
    parser.add_argument("--config", help="TOML preset, e.g. configs/train_tiny.toml")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(rest), overrides


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.config import load_train_config
    from train.data import ShardError
    from train.model_setup import DatasetMismatchError

    try:
        sections = load_train_config(args.config, overrides)
        if not sections["data"].path:
            raise ConfigError("data.path is empty: set it in the preset or with --data.path=DIR")
        from train.trainer import Trainer

        trainer = Trainer(sections)
        skipped = trainer.fit()
        # ends the process group; a process that trains again (tests) must not call this
        trainer.accelerator.end_training()
    # FileNotFoundError here is the user's: a dataset without dataset.json, a resume path that
    # is not a complete checkpoint (train/checkpoint.py), each with a message that says so.
    except (ConfigError, DatasetMismatchError, ShardError, FileNotFoundError) as e:
        print(f"rectiflow train: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if skipped:
        print(f"rectiflow train: {skipped} step(s) skipped for non-finite loss", file=sys.stderr)
    return 0
