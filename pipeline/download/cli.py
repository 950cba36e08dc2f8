"""`rectiflow download RUN_DIR --urls LIST`: URL list -> RUN_DIR/download shards.

    rectiflow download runs/r1 --urls urls.parquet [--config configs/x.toml]
    rectiflow download runs/r1 --urls 's3://bucket/laion/part-*.parquet'   # or a folder, or A B C
                       [--download.thread_count=128 --runner.backend=ray ...]
    rectiflow download runs/r1 --retry-failed [--rounds 3]

`--retry-failed` re-fetches only the rows whose reason is retryable (pipeline/download/retry.py).
`--out RUN_DIR` is the older spelling of RUN_DIR and still works.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from pipeline.core.command import InputError, StageCommand, require_shards
from pipeline.core.manifest import ShardManifest
from pipeline.core.runners import RunnerConfig
from pipeline.core.storage import list_files
from pipeline.download.retry import retry_failed
from pipeline.download.stage import STAGE, DownloadConfig, ShardsFailed, run_download


def flags(parser) -> None:
    parser.add_argument("--out", type=Path, help="same as RUN_DIR (the older spelling)")
    parser.add_argument("--urls", nargs="+", metavar="LIST",
                        help="URL list: .parquet, .csv or .jsonl files, globs or folders of "
                        "parts, local or s3:// / gs:// URLs")
    parser.add_argument("--retry-failed", action="store_true",
                        help="re-fetch only retryable failures of an existing run")
    parser.add_argument("--rounds", type=int, default=1, help="retry rounds (--retry-failed)")


def check(args) -> None:
    if (args.run_dir is None) == (args.out is None):
        raise InputError("give the run directory once: RUN_DIR (or its older spelling --out)")
    args.run_dir = args.run_dir or args.out  # from here on, one name for it
    if args.retry_failed:
        require_shards(args.run_dir, STAGE)
    elif args.urls is None:
        raise InputError("--urls is required (or use --retry-failed on an existing run)")
    else:
        args.urls = list_files(args.urls)  # every part, checked here: a clear error names it
    if args.rounds < 1:
        raise InputError(f"--rounds {args.rounds} must be at least 1")


def run(args, sections) -> int:
    config, runner = sections["download"], sections["runner"]
    try:
        if args.retry_failed:
            manifests = retry_failed(config, runner, args.run_dir, args.rounds)
        else:
            manifests = run_download(config, runner, args.urls, args.run_dir)
    except ShardsFailed as e:  # not a mistake of the user's, nor a bug: the network
        print(f"rectiflow download: {e}", file=sys.stderr)
        return 1
    print(summarize(manifests))
    return 0


def summarize(manifests: list[ShardManifest]) -> str:
    rows_in = sum(m.rows_in for m in manifests)
    rows_out = sum(m.rows_out for m in manifests)
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m.reasons)
    lines = [f"download: {len(manifests)} shards, {rows_out}/{rows_in} samples downloaded"]
    lines += [f"  {reason:<20} {count}" for reason, count in reasons.most_common()]
    return "\n".join(lines)


COMMAND = StageCommand(
    name=STAGE,
    description="Download a URL list into WebDataset shards with a Parquet table per shard "
    "(RUN_DIR/download), resumable; --download.KEY=VALUE and --runner.KEY=VALUE override.",
    schema={"download": DownloadConfig, "runner": RunnerConfig},
    flags=flags,
    check=check,
    run_dir_optional=True,  # for --out
    run_dir_exists=False,  # the download creates it
    run=run,
)
main = COMMAND.main
