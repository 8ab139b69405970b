"""The one config loader: every stage's settings are a frozen dataclass, built here from
YAML plus `section.key=value` overrides.

    cfg = load(SFTConfig, "configs/sft-cpu.yaml", ["train.max_steps=2"], where="sft config")
    cfg = build(BenchConfig, {"system": "boutique", "episode": {"verify_load": False}})

Nested sections become their dataclasses, lists become tuples where the field is one, and
every unknown key, at any depth, is reported in one error that names it and the keys known
there. Nothing is read at import time; the built object is what a run saves beside its
results (`dump`) and what Ray workers are handed."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A user's settings are wrong: the message names the key and the fix."""


def check_keys(where: str, d: Mapping[str, Any], cls, error: type[Exception] = ValueError) -> None:
    """A settings mapping for dataclass `cls` may hold only its fields: a typo is an error
    naming the unknown keys and listing the known ones, never a silently ignored setting."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def build(cls, data: Mapping[str, Any] | None, where: str = "config", error: type[Exception] = ConfigError):
    """The frozen dataclass `cls` from a mapping (see the module docstring)."""
    unknown: list[str] = []
    obj = _build(cls, data or {}, "", unknown)
    if unknown:
        raise error(f"{where}: unknown keys: {'; '.join(unknown)}")
    return obj


def load(cls, path: str | Path | None = None, overrides: typing.Iterable[str] = (), where: str = "config",
         error: type[Exception] = ConfigError):
    """`cls` from a YAML file (None: the defaults) with `section.key=value` overrides on top;
    an override's value is parsed as YAML (`steps=3`, `update.lora=null`)."""
    return build(cls, with_overrides(read_yaml(path, where, error), overrides, error), where, error)


def read_yaml(path: str | Path | None, where: str = "config", error: type[Exception] = ConfigError) -> dict:
    """A YAML mapping ({} for no file); a missing, malformed or non-mapping file is one error."""
    import yaml
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise error(f"{where} {p}: no such file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{where} {p}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{where} {p}: expected a mapping of settings")
    return d


def with_overrides(d: Mapping[str, Any], overrides: typing.Iterable[str],
                   error: type[Exception] = ConfigError) -> dict:
    """A deep copy of `d` with each `a.b.c=value` set (value parsed as YAML)."""
    import copy

    import yaml
    out = copy.deepcopy(dict(d))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise error(f"override '{item}': write it as section.key=value, e.g. steps=3")
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise error(f"override '{item}': {k} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def dump(obj) -> dict:
    """The config as plain data (tuples as lists), to save beside a run's results."""
    return _plain(asdict(obj))


# ---- building -------------------------------------------------------------------------------

def _build(cls, data: Any, path: str, unknown: list[str]):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a section of settings, not {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    extra = sorted(set(data) - known)
    if extra:
        where = f" in {path}" if path else ""
        unknown.append(f"{', '.join(path + '.' * bool(path) + k for k in extra)} (known{where}: "
                       f"{', '.join(sorted(known))})")
    kw = {k: _value(hints[k], v, f"{path}.{k}" if path else k, unknown) for k, v in data.items() if k in known}
    return cls(**kw)


def _value(hint, v: Any, path: str, unknown: list[str]) -> Any:
    hint = _optional(hint)
    if v is None:
        return None
    if is_dataclass(hint) and isinstance(hint, type):
        return v if isinstance(v, hint) else _build(hint, v, path, unknown)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        item = _optional(args[0]) if args else Any
        seq = [v] if isinstance(v, (str, int, float, Mapping)) else list(v)
        return tuple(_value(item, x, f"{path}[{i}]", unknown) for i, x in enumerate(seq))
    if hint is str and isinstance(v, bool):
        return "true" if v else "false"      # YAML's `true` for a setting spelled auto|true|false
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        return dict(v)
    return v


def _optional(hint):
    """X for `X | None` (and Optional[X]); the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


__all__ = ["ConfigError", "build", "check_keys", "dump", "load", "read_yaml", "with_overrides"]
