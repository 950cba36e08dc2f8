"""Typed configuration: one dataclass per component, TOML presets, `--section.key=value`.

A command declares its schema as {section name: dataclass type}; `load_config` reads a TOML
preset whose tables are those sections, applies command-line overrides, and checks every key
and value against the dataclass fields, so a typo fails with a message that names the key,
the value and what is allowed instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import tomli_w

RESOLVED_CONFIG_NAME = "config.resolved.toml"


class ConfigError(ValueError):
    """A config key or value that the schema does not allow."""


def load_config(
    schema: dict[str, type],
    path: str | os.PathLike | None = None,
    overrides: typing.Iterable[str] = (),
    ignore_sections: typing.Collection[str] = (),
) -> dict[str, Any]:
    """Build every section of `schema` from a TOML preset plus `--section.key=value` overrides.

    `ignore_sections` are tables of the file that this command does not read, so that a
    single-stage command can take a whole-run preset (`rectiflow select --config
    configs/curate_demo.toml`); any other unknown table, and overrides naming a section
    outside `schema`, still fail.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        raw = {name: table for name, table in raw.items() if name not in ignore_sections}
    for override in overrides:
        _apply_override(raw, override)
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {unknown}; allowed sections: {sorted(schema)}"
        )
    return {name: build(cls, raw.get(name, {}), name) for name, cls in schema.items()}


def split_overrides(argv: typing.Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides from a command's other arguments."""
    rest, overrides = [], []
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        (overrides if "." in name and "=" in arg else rest).append(arg)
    return rest, overrides


def build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table of keys, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} (value {data[unknown[0]]!r}); "
            f"allowed keys in [{where}]: {sorted(fields)}"
        )
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid [{where}]: {e}") from e


def config_to_dict(section: Any) -> dict[str, Any]:
    """A dataclass as plain TOML-serialisable data (None values dropped, Paths as strings)."""
    return _plain(dataclasses.asdict(section))


def config_hash(sections: dict[str, Any] | Any) -> str:
    """A stable sha256 (hex, 16 chars) of one section or a dict of sections."""
    if dataclasses.is_dataclass(sections):
        data = config_to_dict(sections)
    else:
        data = {name: config_to_dict(s) for name, s in sections.items()}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_resolved_config(out_dir: str | os.PathLike, sections: dict[str, Any]) -> str:
    """Write `config.resolved.toml` (with its hash) beside a run's outputs; return the hash."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = config_hash(sections)
    body = tomli_w.dumps({name: config_to_dict(s) for name, s in sections.items()})
    atomic_write_text(out / RESOLVED_CONFIG_NAME, f"# config hash: {digest}\n{body}")
    return digest


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    text = override[2:] if override.startswith("--") else override
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {override!r} must look like --section.key=value")
    dotted, value_text = text.split("=", 1)
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[key] = _parse_value(value_text)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML value; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where} = {value!r} is not valid: " + "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r} is not allowed; allowed values: {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r} must be a list")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} must be a table")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    return _coerce_scalar(hint, value, where)


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str):
            return Path(value)
    else:
        raise ConfigError(f"{where}: unsupported field type {hint!r}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where} = {value!r} must be of type {name}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
