"""One stage-command helper: every stage command reads RUN_DIR, a section table or a whole-run
preset, `--section.key=value` overrides, and reports a user's mistake on stderr with exit 2.

The commands run for real through `rectiflow`'s dispatcher on empty run directories, so each
stops at its inputs check (no model loads); the parsed sections come from the same commands.
"""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import pytest
import tomli_w

from pipeline import cli
from pipeline.core.command import RUN_PRESET_SECTIONS, InputError, StageCommand
from pipeline.core.config import RESOLVED_CONFIG_NAME
from ray_jobs.curate import SCHEMA as CURATE_SCHEMA

REPO = Path(__file__).resolve().parents[3]
DEMO_PRESET = REPO / "configs" / "curate_demo.toml"

# command -> (its section, an integer key of it); every command that takes a config.
STAGE_KEYS = {
    "download": ("download", "rows_per_shard"),
    "score": ("score", "batch_size"),
    "select": ("select", "min_side"),
    "dedup": ("dedup", "phash_max_distance"),
    "caption": ("caption", "batch_size"),
    "encode": ("encode", "t5_max_length"),
}
STAGES = sorted(STAGE_KEYS)
UPSTREAM = {"score": "download", "select": "score", "dedup": "score", "caption": "download",
            "encode": "download"}


def command(name: str) -> StageCommand:
    module = cli.COMMANDS[name][0].split(":")[0]
    return importlib.import_module(module).COMMAND


def stage_args(name: str, run_dir: Path, tmp_path: Path) -> list[str]:
    """RUN_DIR plus the flags a command needs to get past its own flag checks."""
    if name != "download":
        return [str(run_dir)]
    urls = tmp_path / "urls.jsonl"
    urls.touch()
    return [str(run_dir), "--urls", str(urls), "--download.processes_count=0"]


def write_toml(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def whole_run_preset(tmp_path) -> tuple[Path, dict]:
    """configs/curate_demo.toml with a value set for each STAGE_KEYS key it leaves out."""
    raw = tomllib.loads(DEMO_PRESET.read_text())
    for section, key in STAGE_KEYS.values():
        raw.setdefault(section, {}).setdefault(key, 7)
    return write_toml(tmp_path / "whole_run.toml", raw), raw


def test_the_helper_skips_exactly_the_tables_of_a_whole_run_preset():
    assert set(RUN_PRESET_SECTIONS) == set(CURATE_SCHEMA)


@pytest.mark.parametrize("name", STAGES)
def test_each_command_reads_its_own_tables_of_a_whole_run_preset(name, whole_run_preset, tmp_path):
    path, raw = whole_run_preset
    section, key = STAGE_KEYS[name]
    args, sections = command(name).parse([*stage_args(name, tmp_path, tmp_path), "--config", str(path)])
    assert set(sections) == set(command(name).schema)
    assert getattr(sections[section], key) == raw[section][key]
    if name == "download":  # [runner] belongs to the download in a whole-run preset
        assert sections["runner"].concurrency == raw["runner"]["concurrency"]
    assert args.run_dir == tmp_path


@pytest.mark.parametrize("name", STAGES)
def test_the_committed_demo_preset_takes_every_command_to_its_inputs(name, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = cli.main([name, *stage_args(name, run_dir, tmp_path), "--config", str(DEMO_PRESET)])
    out, err = capsys.readouterr()
    if name == "download":  # an empty URL list is nothing to do, and not an error
        assert code == 0 and "0 shards" in out
        resolved = tomllib.loads((run_dir / "download" / RESOLVED_CONFIG_NAME).read_text())
        assert resolved["download"]["rows_per_shard"] == 16 and resolved["runner"]["concurrency"] == 2
        return
    upstream = run_dir / UPSTREAM[name]
    assert code == 2 and out == ""
    assert err.startswith(f"rectiflow {name}: no completed {UPSTREAM[name]} shards in {upstream}")
    assert not (run_dir / name).exists()  # stopped before writing anything


@pytest.mark.parametrize("name", STAGES)
def test_a_single_section_table_works_and_overrides_win(name, tmp_path):
    section, key = STAGE_KEYS[name]
    path = write_toml(tmp_path / "one.toml", {section: {key: 5}})
    argv = [*stage_args(name, tmp_path, tmp_path), "--config", str(path)]
    assert getattr(command(name).parse(argv)[1][section], key) == 5
    assert getattr(command(name).parse([*argv, f"--{section}.{key}=9"])[1][section], key) == 9


@pytest.mark.parametrize("name", STAGES)
def test_overrides_win_over_the_whole_run_preset(name, whole_run_preset, tmp_path):
    path, _ = whole_run_preset
    section, key = STAGE_KEYS[name]
    argv = [*stage_args(name, tmp_path, tmp_path), "--config", str(path), f"--{section}.{key}=11"]
    assert getattr(command(name).parse(argv)[1][section], key) == 11


@pytest.mark.parametrize("name", STAGES)
def test_an_unknown_key_in_its_own_section_fails_naming_the_key(name, whole_run_preset, tmp_path, capsys):
    path, raw = whole_run_preset
    section, _ = STAGE_KEYS[name]
    raw[section]["batch_sizes"] = 4
    bad = write_toml(tmp_path / "typo.toml", raw)
    code = cli.main([name, *stage_args(name, tmp_path / "run", tmp_path), "--config", str(bad)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"rectiflow {name}: ") and f"{section}.batch_sizes" in err
    assert cli.main([name, *stage_args(name, tmp_path / "run", tmp_path), f"--{section}.nope=1"]) == 2
    assert f"{section}.nope" in capsys.readouterr().err


@pytest.mark.parametrize("name", STAGES)
def test_a_table_no_stage_knows_is_still_an_error(name, tmp_path, capsys):
    section, key = STAGE_KEYS[name]
    bad = write_toml(tmp_path / "typo.toml", {f"{section}s": {key: 1}})
    assert cli.main([name, *stage_args(name, tmp_path, tmp_path), "--config", str(bad)]) == 2
    assert f"'{section}s'" in capsys.readouterr().err


@pytest.mark.parametrize("name", STAGES)
def test_a_bad_value_fails_with_exit_2(name, tmp_path, capsys):
    section, key = STAGE_KEYS[name]
    code = cli.main([name, *stage_args(name, tmp_path, tmp_path), f"--{section}.{key}=many"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert f"{section}.{key} = 'many'" in err


@pytest.mark.parametrize("name", [*STAGES, "inspect"])
def test_a_missing_run_dir_fails_with_a_message(name, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    if name == "download":  # the download creates its run; a retry needs one
        code = cli.main([name, str(missing), "--retry-failed"])
        expected = f"no completed download shards in {missing / 'download'}"
    else:
        code = cli.main([name, str(missing)])
        expected = f"run directory {missing} does not exist"
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f"rectiflow {name}: {expected}" + (
        ": run `rectiflow download` first\n" if name == "download" else "\n")
    assert not missing.exists()


def test_a_missing_config_file_and_a_missing_url_list_fail_with_exit_2(tmp_path, capsys):
    assert cli.main(["score", str(tmp_path), "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml does not exist" in capsys.readouterr().err
    assert cli.main(["download", str(tmp_path), "--urls", str(tmp_path / "urls.parquet")]) == 2
    assert "urls.parquet does not exist" in capsys.readouterr().err


def test_download_still_takes_out_and_select_its_preset_flag(tmp_path, capsys):
    urls = tmp_path / "urls.jsonl"
    urls.touch()
    run_dir = tmp_path / "run"
    argv = ["--urls", str(urls), "--out", str(run_dir), "--download.processes_count=0"]
    assert cli.main(["download", *argv]) == 0
    assert (run_dir / "download" / RESOLVED_CONFIG_NAME).exists()
    assert cli.main(["download", str(run_dir), *argv]) == 2  # the run dir given twice
    assert "give the run directory once" in capsys.readouterr().err
    argv = [str(tmp_path), "--config", str(DEMO_PRESET), "--preset", "datacomp_clip_top30"]
    assert command("select").parse(argv)[1]["select"].preset == "datacomp_clip_top30"


def test_dedup_keeps_its_input_and_out_mode(tmp_path, capsys):
    assert cli.main(["dedup", "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli.main(["dedup"]) == 2
    assert "give either RUN_DIR, or --input and --out" in capsys.readouterr().err
    empty = tmp_path / "tables"
    empty.mkdir()
    assert cli.main(["dedup", "--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert f"no Parquet tables in {empty}" in capsys.readouterr().err


def test_inspect_reports_an_empty_run_on_stderr(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"rectiflow inspect: no stage tables under {tmp_path}\n"
    assert cli.main(["inspect", str(tmp_path), "--select.preset=none"]) == 2
    assert "takes no config" in capsys.readouterr().err


def test_user_errors_exit_2_and_bugs_raise(tmp_path, capsys):
    calls = []

    def run(args, sections):
        calls.append(sections["select"].min_side)
        if args.run_dir.name == "bug":
            raise ValueError("a bug, not a user's mistake")
        raise InputError("nothing to do here")

    from pipeline.select.stage import SelectConfig

    toy = StageCommand(name="toy", description="a toy stage", schema={"select": SelectConfig}, run=run)
    (tmp_path / "bug").mkdir()
    with pytest.raises(ValueError, match="a bug"):
        toy.main([str(tmp_path / "bug"), "--select.min_side=3"])
    assert toy.main([str(tmp_path), "--select.min_side=4"]) == 2
    assert capsys.readouterr().err == "rectiflow toy: nothing to do here\n"
    assert calls == [3, 4]
    # The resolved config was written before the stage ran, where every stage writes it.
    resolved = (tmp_path / "toy" / RESOLVED_CONFIG_NAME).read_text()
    assert resolved.startswith("# config hash: ") and tomllib.loads(resolved)["select"]["min_side"] == 4
    assert json.loads(json.dumps(tomllib.loads(resolved)))  # plain TOML data, no Paths


def test_verify_is_a_flag_of_the_commands_that_take_it(tmp_path):
    from pipeline.core.run_lock import holds_lock

    seen = []

    def run(args, sections):
        seen.append((getattr(args, "verify", None), holds_lock(args.run_dir)))

    from dedup.config import DedupConfig

    schema = {"dedup": DedupConfig}
    verifying = StageCommand(name="toy", description="d", schema=schema, run=run, verifies=True)
    plain = StageCommand(name="toy", description="d", schema=schema, run=run)
    assert verifying.main([str(tmp_path), "--verify"]) == 0
    assert verifying.main([str(tmp_path)]) == 0
    assert seen == [(True, True), (False, True)]  # and the run held the run directory's lock
    with pytest.raises(SystemExit):
        plain.main([str(tmp_path), "--verify"])  # argparse: unrecognised argument
    assert not holds_lock(tmp_path)
