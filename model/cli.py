"""`rectiflow models ...`: commands about models (for now, writing the offline tiny bundle)."""

from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectiflow models", description="Commands about models.")
    commands = parser.add_subparsers(dest="command", required=True)
    make_tiny = commands.add_parser(
        "make-tiny",
        help="write random-weight tiny models (SD3 diffusers folder, open_clip, LLaVA captioner)",
        description="Write OUT_DIR/sd3, OUT_DIR/open_clip and OUT_DIR/captioner offline, "
        "deterministically from the seed. Random weights: for tests and demos, not for quality.",
    )
    make_tiny.add_argument("out_dir", metavar="OUT_DIR")
    make_tiny.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-tiny":
        from model.tiny import make_tiny_bundle

        out_dir = make_tiny_bundle(args.out_dir, seed=args.seed)
        print(f"wrote tiny models to {out_dir} (sd3/, open_clip/, captioner/)")
    return 0
