"""One stage command: `rectiflow <stage> RUN_DIR [--config X.toml] [--section.key=value ...]`.

Every stage command (download, score, select, dedup, caption, encode, inspect) is a
`StageCommand`: its description, its config sections, its own flags and a run function. The
helper keeps the conventions in one place:
- `--config` takes a table for the command (`[score]`) or a whole-run preset
  (configs/curate_demo.toml): the command reads its own sections and ignores the other
  tables of a run preset, but an unknown key in its own section, or a table no stage knows,
  is still an error; `--section.key=value` overrides win over the file;
- the resolved config is written to the stage's output folder before the stage runs;
- a command that writes (one with a config) holds the run directory's lock while it runs
  (pipeline/core/run_lock.py): a second run on the same directory is refused;
- `--verify` (commands with `verifies`): shards count as done only if their outputs still
  hash to the recorded sha256, not just have the recorded sizes;
- a user's mistake (`ConfigError`, `InputError`, a held run lock, or a stage's own declared
  error) is printed to stderr as `rectiflow <stage>: <message>` with exit code 2; anything
  else is a bug and raises with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, load_config, split_overrides, write_resolved_config
from pipeline.core.manifest import manifest_shards
from pipeline.core.run_lock import RunLocked, run_lock
from pipeline.core.storage import StorageError

# The tables of a whole-run preset (ray_jobs/curate.py's SCHEMA; a test keeps them equal). A
# stage command skips the ones it does not read; any other table is a typo and fails.
RUN_PRESET_SECTIONS = ("run", "runner", "download", "score", "select", "dedup", "caption", "encode")

EXIT_USER_ERROR = 2  # argparse's code for bad usage; a bad config is the same kind of mistake

Sections = dict[str, Any]


class InputError(Exception):
    """What a stage needs from the run is missing or unusable (no completed download shards,
    a URL list without its URL column): the user's to fix, so reported without a traceback."""


@dataclass(frozen=True)
class StageCommand:
    """A stage's command line; `main(argv)` parses, checks, writes the config and runs."""

    name: str  # the command: "rectiflow <name>"; also its output folder in RUN_DIR
    description: str
    run: Callable[[argparse.Namespace, Sections], int | None]
    schema: dict[str, type] | None = None  # config sections; None: the command takes no config
    flags: Callable[[argparse.ArgumentParser], None] | None = None  # the stage's own flags
    check: Callable[[argparse.Namespace], None] | None = None  # flag rules; raise InputError
    shorthands: Callable[[argparse.Namespace], list[str]] | None = None  # flags -> overrides
    needs: str | None = None  # the upstream stage in RUN_DIR whose completed shards it reads
    run_dir_optional: bool = False  # RUN_DIR may be left out (the command has another mode)
    run_dir_exists: bool = True  # RUN_DIR, when given, must already exist (an input)
    output_dir: Callable[[argparse.Namespace], Path] | None = None  # default RUN_DIR/<name>
    user_errors: tuple[type[Exception], ...] = ()  # the stage's own "user's mistake" errors
    verifies: bool = False  # takes --verify (its run passes args.verify on to the stage)

    @property
    def prog(self) -> str:
        return f"rectiflow {self.name}"

    def main(self, argv: Sequence[str]) -> int:
        try:
            args, sections = self.parse(argv)
            self._check_inputs(args)
            with self._lock(args):
                if self.schema is not None:
                    write_resolved_config(self._output_dir(args), sections)
                return int(self.run(args, sections) or 0)
        except (ConfigError, InputError, StorageError, RunLocked, *self.user_errors) as e:
            print(f"{self.prog}: {e}", file=sys.stderr)
            return EXIT_USER_ERROR

    def parse(self, argv: Sequence[str]) -> tuple[argparse.Namespace, Sections]:
        """The parsed flags and the checked config sections (ConfigError on a bad one)."""
        rest, overrides = split_overrides(argv)
        if self.schema is None and overrides:
            raise ConfigError(f"{self.prog} takes no config; unexpected {overrides[0]}")
        args = self.parser().parse_args(rest)
        if self.shorthands is not None:
            overrides += self.shorthands(args)  # after the user's: the flag is the last word
        sections = {}
        if self.schema is not None:
            skipped = [name for name in RUN_PRESET_SECTIONS if name not in self.schema]
            sections = load_config(self.schema, args.config, overrides, ignore_sections=skipped)
        if self.check is not None:
            self.check(args)
        return args, sections

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog, description=self.description, epilog=self._config_help()
        )
        parser.add_argument(
            "run_dir", type=Path, metavar="RUN_DIR", nargs="?" if self.run_dir_optional else None,
            help="the run directory (one folder per stage inside)",
        )  # fmt: skip
        if self.schema is not None:
            tables = ", ".join(f"[{name}]" for name in self.schema)
            parser.add_argument(
                "--config", type=Path,
                help=f"TOML with {tables}, or a whole-run preset (only those tables are read)",
            )  # fmt: skip
        if self.verifies:
            parser.add_argument(
                "--verify", action="store_true",
                help="re-hash the outputs of done shards against their recorded sha256 "
                     "(default: a done shard's outputs need only exist with the recorded sizes)",
            )  # fmt: skip
        if self.flags is not None:
            self.flags(parser)
        return parser

    def _config_help(self) -> str | None:
        if self.schema is None:
            return None
        first = next(iter(self.schema))
        return (f"Override any setting as --{first}.KEY=VALUE (in a nested table: "
                f"--{first}.TABLE.KEY=VALUE); overrides win over --config.")

    def _check_inputs(self, args: argparse.Namespace) -> None:
        run_dir = args.run_dir
        if run_dir is None:
            return
        if self.run_dir_exists and not run_dir.is_dir():
            problem = "is not a directory" if run_dir.exists() else "does not exist"
            raise InputError(f"run directory {run_dir} {problem}")
        if self.needs is not None:
            require_shards(run_dir, self.needs)

    def _lock(self, args: argparse.Namespace) -> AbstractContextManager:
        """The run directory's lock for a command that writes (the folder above its output)."""
        if self.schema is None:
            return nullcontext()  # reads only (inspect): never refused, never refuses
        return run_lock(self._output_dir(args).parent)

    def _output_dir(self, args: argparse.Namespace) -> Path:
        return self.output_dir(args) if self.output_dir else args.run_dir / self.name


def require_shards(run_dir: Path, stage: str) -> list[str]:
    """The completed shards of `stage` in `run_dir`; InputError when there are none."""
    shards = manifest_shards(Path(run_dir) / stage)
    if not shards:
        raise InputError(
            f"no completed {stage} shards in {Path(run_dir) / stage}: run `rectiflow {stage}` first"
        )
    return shards
