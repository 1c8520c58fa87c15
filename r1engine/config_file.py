"""Typed YAML configs: nested dicts (a YAML file plus ``dotted.key=value`` overrides) checked into dataclasses, with
one-line errors that name the key at fault. The trainer's and the reward-model trainer's configs load through it."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = ["ConfigError", "apply_override", "from_dict", "load_dataclass", "set_dotted", "yaml_problem"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if annotation is Any:
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # one file where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # a bug in the dataclass, not in the YAML


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """``cls`` (a dataclass) from a nested dict, each value checked against its field's annotation; unknown keys and
    wrong types are a ConfigError naming the dotted key (``prefix`` is the key of ``data`` itself)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    return cls(**kwargs)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint in one line, with the line and column where it has them (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """A copy of `data` with the nested entry named by `key` ("grpo.steps") set to `value`. The value replaces the
    entry whole, a mapping too (`rewards.weights={math_accuracy: 1}` is that route, not a merge with the file's);
    `rewards.weights.format=0.5` changes one entry."""
    parts = key.strip().split(".")
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value
    return out


def apply_override(data: dict, override: str) -> dict:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({yaml_problem(exc)})") from None
    return set_dotted(data, key, value)


def load_dataclass(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """``cls`` from a YAML file (None: the defaults) with ``key=value`` overrides applied, type-checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys at the top, got "
                              f"{type(data).__name__}")  # fmt: skip
    for override in overrides:
        data = apply_override(data, override)
    return from_dict(cls, data)
