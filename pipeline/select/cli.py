"""`rectiflow select RUN_DIR`: choose the samples to keep from the scores; nothing is deleted."""

from __future__ import annotations

from pipeline.core.command import StageCommand
from pipeline.select.stage import PRESETS, SelectConfig, SelectError, describe, run_select


def flags(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shorthand for --select.preset")


def run(args, sections) -> None:
    select: SelectConfig = sections["select"]
    result = run_select(args.run_dir, select, verify=args.verify)
    print("rules: " + ("; ".join(describe(select)) or "none (everything kept)"))
    print(f"kept {result.rows_out} of {result.rows_in} scored samples "
          f"({len(result.shards)} shards, {len(result.redone)} redone)")
    for rule in result.rules.to_pylist():
        print(f"  {rule['rule']:<22} {rule['threshold']:<32} removed {rule['removed']:>8}"
              f"  (failed {rule['failed']})")
        if rule["note"]:
            print(f"    {rule['note']}")


COMMAND = StageCommand(
    name="select",
    description="Write RUN_DIR/select/NNNNN.parquet (one per score shard) and rules.parquet "
    "from RUN_DIR/score. Rules: --select.KEY=VALUE (nsfw_max, aesthetic_min, clip_min, "
    "clip_top_percent, min_side, max_aspect, min_caption_words, min_caption_chars, english_like; "
    "--select.column_min.NAME=V / --select.column_max.NAME=V on a list's numeric columns).",
    schema={"select": SelectConfig},
    flags=flags,
    shorthands=lambda args: [f"--select.preset={args.preset}"] if args.preset else [],
    needs="score",
    verifies=True,
    user_errors=(SelectError,),
    run=run,
)
main = COMMAND.main
