"""`rectiflow dedup`: deduplicate the score stage's tables of a run.

rectiflow dedup runs/x [--config preset.toml] [--dedup.semantic_mode=sd3] [--force]
rectiflow dedup --input tables/ --out dedup/ [...]     # any folder of Parquet tables
"""

from __future__ import annotations

from pathlib import Path

from dedup.config import DedupConfig
from dedup.stage import STAGE, run_dedup, run_dedup_for_run
from pipeline.core.command import InputError, StageCommand


def flags(parser) -> None:
    parser.add_argument("--input", type=Path, help="instead of a run: a folder of Parquet tables")
    parser.add_argument("--out", type=Path, help="with --input: the output folder")
    parser.add_argument("--force", action="store_true", help="redo even if outputs are current")


def check(args) -> None:
    if (args.run_dir is None) == (args.input is None) or (args.input is None) != (args.out is None):
        raise InputError("give either RUN_DIR, or --input and --out")
    if args.input is not None and not args.input.is_dir():
        raise InputError(f"--input {args.input} is not a directory")


def run(args, sections) -> None:
    config: DedupConfig = sections["dedup"]
    if args.run_dir is not None:
        result = run_dedup_for_run(config, args.run_dir, force=args.force, verify=args.verify)
    else:
        result = run_dedup(config, args.input, args.out, force=args.force, verify=args.verify)
    m = result.manifest
    verb = "deduplicated" if result.ran else "already done (config and inputs unchanged):"
    print(f"{verb} {m.rows_in} rows -> {m.rows_out} kept; dropped {m.reasons}; "
          f"out: {args.out or args.run_dir / STAGE}")


COMMAND = StageCommand(
    name=STAGE,
    description="Exact (sha256), perceptual (pHash) and semantic (faiss) dedup of a run's "
    "score tables (RUN_DIR/score -> RUN_DIR/dedup), or of any folder of tables (--input).",
    schema={"dedup": DedupConfig},
    flags=flags,
    check=check,
    needs="score",
    verifies=True,
    run_dir_optional=True,  # --input/--out instead
    output_dir=lambda args: args.out or args.run_dir / STAGE,
    run=run,
)
main = COMMAND.main
