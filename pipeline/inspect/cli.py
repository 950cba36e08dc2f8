"""`rectiflow inspect RUN_DIR [--uid X]`: the funnel of a run, or why one sample was dropped."""

from __future__ import annotations

import json
from dataclasses import asdict

from pipeline.core.command import InputError, StageCommand
from pipeline.inspect.funnel import explain_uid, format_funnel, format_story, funnel


def flags(parser) -> None:
    parser.add_argument("--uid", action="append", default=[], help="explain this uid (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args, _sections) -> int:
    if not args.uid:
        counts = funnel(args.run_dir)
        if not counts:
            raise InputError(f"no stage tables under {args.run_dir}")
        print(json.dumps([asdict(c) for c in counts]) if args.json else format_funnel(counts))
        return 0
    stories = {uid: explain_uid(args.run_dir, uid) for uid in args.uid}
    if args.json:
        print(json.dumps({uid: [asdict(v) for v in vs] for uid, vs in stories.items()}, default=str))
    else:
        print("\n\n".join(format_story(uid, vs) for uid, vs in stories.items()))
    found = all(any(v.row for v in vs) for vs in stories.values())
    return 0 if found else 1  # like grep: 1 says "no such uid", not a mistake in the call


COMMAND = StageCommand(
    name="inspect",
    description="Print the funnel (rows in and out per stage, drop reasons) of a run, "
    "or, with --uid, what each stage did with one sample and why it was dropped.",
    flags=flags,
    run=run,
)
main = COMMAND.main
