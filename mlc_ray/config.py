"""Typed job configuration: a dataclass per job, filled from a YAML file plus CLI overrides.

Every job (train, tag, promote, scan) describes its settings as a dataclass whose fields carry
defaults and whose ``__post_init__`` validates them. ``load_config`` merges, in order:
the dataclass defaults, a YAML file (``--config``), then the flags the user gave on the command
line. Unknown keys are errors that name the key and suggest the closest known one, because a
misspelt key silently ignored is a training run wasted. The resolved config is saved with the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mlc_ray.errors import ConfigError

__all__ = [
    "ConfigError",
    "load_config",
    "merged_config_data",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
]

T = TypeVar("T")


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError naming the key."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section '{tp.__name__}', got {value!r}")
        return config_from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, Mapping | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_norm = str(key).replace("-", "_")
        if key_norm not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{_suggest(key_norm, fields)}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
        kwargs[key_norm] = _coerce(value, hints[key_norm], f"{prefix}{key_norm}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        # the config's own messages name their key ("epochs must be > 0"); a section adds its name
        message, section = str(exc), prefix.rstrip(".")
        raise ConfigError(f"{section}: {message}" if section and section not in message else message) from exc


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _unflatten(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Turn {'mining.top_k': 5} into {'mining': {'top_k': 5}} so CLI flags can reach sections."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"bad config key '{key}': expected KEY or SECTION.KEY (e.g. mining.top_k)")
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section: '{key}'"
                )
        node[parts[-1]] = value
    return out


def merged_config_data(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw mapping ``load_config`` builds its dataclass from: ``base`` < YAML file < overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        from mlc_ray import storage  # local import: storage pulls boto3, config should stay light

        try:
            text = storage.read_text(str(path))
        except FileNotFoundError:
            raise ConfigError(f"--config: config file {path} does not exist") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {_first_line(exc)}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(loaded).__name__}")
        data = dict(loaded)
    if base:
        data = _deep_merge(dict(base), data)
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        data = _deep_merge(data, _unflatten(given))
    return data


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults < ``base`` (a preset) < YAML file < overrides (CLI flags the user actually gave;
    ``None`` means not given)."""
    return config_from_dict(cls, merged_config_data(path, overrides, base=base))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict of a config dataclass (tuples become lists)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
