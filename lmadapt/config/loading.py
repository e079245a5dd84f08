"""Loading a config: YAML files with `base:` includes, `key.sub=value` overrides, typed coercion."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from lmadapt.config.schema import Config, ConfigError
from lmadapt.config.validation import validate

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), *, models_from_versions: bool = False
                ) -> Config:
    """Read a YAML config (with `base:` includes), apply `key.sub=value` overrides, validate.

    `models_from_versions`: the caller scores models that carry their own architecture (eval.py over a lineage),
    so the config's `model` section is not held against `train.seq_len`.
    Raises ConfigError with one line naming the file, key, value and expectation.
    """
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        raw = _read_yaml_tree(os.fspath(path), seen=())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        _set_dotted(raw, key.strip(), value, origin="command line")
    cfg = _build(Config, raw, prefix="", origin=origin)
    validate(cfg, origin, models_from_versions=models_from_versions)
    return cfg


def section_from_dict(cls: type, raw: dict[str, Any], origin: str = "<dict>", prefix: str = "") -> Any:
    """One config section (e.g. ModelConfig) from a plain dict, with the same checks as a YAML file."""
    return _build(cls, raw, prefix=prefix, origin=origin)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (YAML/JSON-ready) of a config tree."""
    return dataclasses.asdict(cfg)


def _read_yaml_tree(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({_yaml_problem(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: key 'base' has value {bases!r}; expected a config file path or a list of them")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):  # name the including file too: the user edits that one
            raise ConfigError(f"{path}: key 'base' has value {base!r}; config file {base_path!r} not found")
        _deep_merge(merged, _read_yaml_tree(base_path, seen + (real,)))
    _deep_merge(merged, data)
    return merged


def _yaml_problem(e: Exception) -> str:
    # `problem` is PyYAML's one-line description; errors without one (a reader error on a control
    # character) print a multi-line text with the position, flattened here to keep errors to one line.
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):  # `data.sources.0.path=...` indexes a list of sections
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:i])} has {len(node)} entries; "
                                  f"{p!r} is not one of their indices")
            node = node[int(p)]
            continue
        if p not in node and parts[i + 1].isdigit():
            raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:i + 1])} is not set in the config file, so it "
                              f"has no entry {parts[i + 1]} (set the whole list: {'.'.join(parts[:i + 1])}=[...])")
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"{origin}: key {key!r}: {p!r} is not a section")
        node = nxt
    if isinstance(node, list):
        if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
            raise ConfigError(f"{origin}: key {key!r}: {'.'.join(parts[:-1])} has {len(node)} entries")
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, origin: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: key {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be ints or null too
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"{origin}: unknown key {key!r} (known keys under {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key + ".", origin)
        else:
            kwargs[name] = _coerce(value, hint, key, origin)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{origin}: key {key!r} has value {value!r}; expected {_type_name(hint)}")

    org = typing.get_origin(hint)
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError:
                continue
        raise bad()
    if org is Literal:
        choices = typing.get_args(hint)
        # YAML 1.1 reads a bare on/off as a bool; take the user at their word for on/off choices.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            return "on" if value else "off"
        if value in choices and not isinstance(value, bool):
            return value
        raise bad()
    if hint is type(None):
        if value is None:
            return None
        raise bad()
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean a number.
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise bad()
        if not math.isfinite(number):  # .inf / .nan would only surface as a diverged run, much later
            raise ConfigError(f"{origin}: key {key!r} has value {value!r}; expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    if org is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(hint) or (Any,)
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}.{i}.", origin) for i, v in enumerate(value)]
        return [_coerce(v, item, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if hint is Any:
        return value
    raise bad()
