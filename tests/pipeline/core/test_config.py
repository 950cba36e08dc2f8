"""Config loading: presets, overrides, errors that name key, value and what is allowed."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.core.config import (
    RESOLVED_CONFIG_NAME,
    ConfigError,
    config_hash,
    load_config,
    split_overrides,
    write_resolved_config,
)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr = {self.lr} must be positive")


@dataclass
class Data:
    path: Path | None = None
    batch_size: int = 8
    shuffle: bool = True


SCHEMA = {"optim": Optim, "data": Data}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(SCHEMA)
    assert cfg["optim"] == Optim() and cfg["data"] == Data()


def test_preset_then_overrides_win(tmp_path):
    preset = write(tmp_path, '[optim]\nlr = 3e-4\nschedule = "cosine"\n[data]\nbatch_size = 4\n')
    cfg = load_config(
        SCHEMA, preset, ["--optim.lr=1e-3", "--data.path=/tmp/shards", "--data.shuffle=false"]
    )
    assert cfg["optim"].lr == pytest.approx(1e-3)
    assert cfg["optim"].schedule == "cosine"
    assert cfg["data"].batch_size == 4
    assert cfg["data"].path == Path("/tmp/shards")
    assert cfg["data"].shuffle is False


def test_int_accepted_for_float_and_lists_parsed():
    cfg = load_config(SCHEMA, None, ["--optim.lr=1", "--optim.betas=[0.8, 0.95]"])
    assert isinstance(cfg["optim"].lr, float) and cfg["optim"].betas == [0.8, 0.95]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--optim.lrr=1", ["optim.lrr", "allowed keys", "lr"]),
        ("--data.batch_size=big", ["data.batch_size", "'big'", "int"]),
        ("--optim.schedule=linear", ["optim.schedule", "'linear'", "constant", "cosine"]),
        ("--optim.lr=-1", ["optim", "lr = -1.0 must be positive"]),
        ("--model.depth=3", ["unknown config section", "model", "allowed sections"]),
        ("--data.shuffle=1", ["data.shuffle", "bool"]),
    ],
)
def test_bad_keys_and_values_are_named(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(SCHEMA, None, [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SCHEMA, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(SCHEMA, write(tmp_path, "[optim\n"))


def test_override_syntax_is_checked():
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(SCHEMA, None, ["--lr=3"])


def test_split_overrides_separates_flags():
    rest, overrides = split_overrides(["--config", "a.toml", "--optim.lr=2", "pos", "--out=x"])
    assert overrides == ["--optim.lr=2"]
    assert rest == ["--config", "a.toml", "pos", "--out=x"]


def test_resolved_config_written_with_hash(tmp_path):
    cfg = load_config(SCHEMA, None, ["--optim.lr=2e-4"])
    digest = write_resolved_config(tmp_path, cfg)
    text = (tmp_path / RESOLVED_CONFIG_NAME).read_text()
    assert text.startswith(f"# config hash: {digest}")
    # The written file is itself a valid preset that reproduces the same config and hash.
    again = load_config(SCHEMA, tmp_path / RESOLVED_CONFIG_NAME)
    assert again == cfg and config_hash(again) == digest
    assert config_hash(load_config(SCHEMA)) != digest
