"""The `rectiflow` entry point: help lists only commands that import and answer --help."""

import importlib
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.core.command import StageCommand

STAGE_COMMANDS = ["download", "score", "select", "dedup", "caption", "encode", "inspect"]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_fails(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_listed_command_exists_and_answers_help(name):
    function = cli.resolve(name)
    assert callable(function)
    with pytest.raises(SystemExit) as exit_:
        function(["--help"])
    assert exit_.value.code == 0


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "commands:" in result.stdout


@pytest.mark.parametrize("name", STAGE_COMMANDS)
def test_every_stage_command_is_built_on_the_one_helper(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name][0].split(":")[0])
    assert isinstance(module.COMMAND, StageCommand) and cli.resolve(name) == module.COMMAND.main
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal
    assert "RUN_DIR" in usage
    if name != "inspect":
        assert "whole-run preset" in usage and "overrides win over --config" in usage
