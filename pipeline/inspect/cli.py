"""`rectiflow inspect RUN_DIR [--uid X]`: the funnel of a run, or why one sample was dropped."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline.inspect.funnel import explain_uid, format_funnel, format_story, funnel


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rectiflow inspect",
        description="Print the funnel (rows in and out per stage, drop reasons) of a run, "
        "or, with --uid, what each stage did with one sample and why it was dropped.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--uid", action="append", default=[], help="explain this uid (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"rectiflow inspect: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    if not args.uid:
        counts = funnel(args.run_dir)
        if not counts:
            print(f"rectiflow inspect: no stage tables under {args.run_dir}", file=sys.stderr)
            return 1
        print(json.dumps([asdict(c) for c in counts]) if args.json else format_funnel(counts))
        return 0
    stories = {uid: explain_uid(args.run_dir, uid) for uid in args.uid}
    if args.json:
        print(json.dumps({uid: [asdict(v) for v in vs] for uid, vs in stories.items()}, default=str))
    else:
        print("\n\n".join(format_story(uid, vs) for uid, vs in stories.items()))
    found = all(any(v.row for v in vs) for vs in stories.values())
    return 0 if found else 1
