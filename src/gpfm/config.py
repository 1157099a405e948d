"""Typed configs: dataclasses filled from YAML, then from dotted command-line overrides (`optim.lr=1e-3`).

Unknown keys are errors that name the full dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gpfm.io import GpfmError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, checking keys and coercing simple types."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise GpfmError(f"config{_at(where)}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise GpfmError(f"unknown config key '{key}' (valid here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise GpfmError(f"config{_at(where)}: {e}") from e


def _at(where: str) -> str:
    return f" at '{where}'" if where else ""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise GpfmError(f"config key '{where}': expected a list, got {value!r}")
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is Any or origin is not None:
        return value
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads '2e-4' (no dot) as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise GpfmError(f"config key '{where}': expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise GpfmError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise GpfmError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GpfmError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise GpfmError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise GpfmError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Defaults of `cls` <- optional `base` dict <- YAML file at `path` (its `base:` key names a parent file,
    resolved next to it) <- dotted overrides."""
    data: dict[str, Any] = _deep_merge({}, base or {})
    if path is not None:
        data = _deep_merge(data, _load_with_base(Path(path)))
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _load_with_base(path: Path) -> dict[str, Any]:
    data = load_yaml(path)
    parent = data.pop("base", None)
    if parent:
        data = _deep_merge(_load_with_base((path.parent / parent).resolve()), data)
    return data


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    from gpfm.io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
