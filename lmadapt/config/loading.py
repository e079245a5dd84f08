"""Loading a config: YAML files with `base:` includes, `key.sub=value` overrides, typed coercion."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import yaml

from lmadapt.config.base import ConfigError, as_tuples
from lmadapt.config.recipes import apply_recipe
from lmadapt.config.schema import Config
from lmadapt.config.validation import validate
from lmadapt.files.paths import file_problem, open_regular

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), *, models_from_versions: bool = False
                ) -> Config:
    """Read a YAML config (with `base:` includes), apply `key.sub=value` overrides, validate.

    `models_from_versions`: the caller scores models that carry their own architecture (eval.py over a lineage),
    so the config's `model` section is not held against `train.seq_len`.
    Raises ConfigError with one line naming the file (or, for a key an override set, the override), key, value
    and expectation.
    """
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        raw = _read_yaml_tree(os.fspath(path), seen=())
    where = _Where(origin)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = _parse_yaml(text) if text.strip() else None
        except _DuplicateKey as e:
            raise ConfigError(f"{where.override(item)}: {e.describe(key.strip())}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        where.overrides.append((key.strip(), item))
        _set_dotted(raw, key.strip(), value, origin=where.override(item))
    raw = apply_recipe(raw, where("continual.recipe"))
    cfg = _build(Config, raw, prefix="", origin=where)
    try:
        validate(cfg, origin, models_from_versions=models_from_versions)
    except ConfigError as e:
        raise where.reattribute(e) from None
    return cfg


class _Where:
    """Who set a key: the config file, or the last command-line override that set it (or a section around it,
    or a key inside it). Errors name that one, so a typo on the command line is not blamed on the file."""

    def __init__(self, origin: str):
        self.origin = origin
        self.overrides: list[tuple[str, str]] = []  # (dotted key, the override as given)

    @staticmethod
    def override(item: str) -> str:
        return f"override {item!r} (command line)"

    def __call__(self, key: str) -> str:
        key = re.sub(r"\[(\d+)\]", r".\1", key)  # list items: `a.b[0]` is the override key `a.b.0`
        for set_key, item in reversed(self.overrides):
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return self.override(item)
        return self.origin

    def reattribute(self, e: ConfigError) -> ConfigError:
        """A validation error (`<origin>: key 'k' ...`) renamed after whoever set k."""
        match = re.match(re.escape(self.origin) + r": key '([^']*)'", str(e))
        where = self(match.group(1)) if match else self.origin
        return e if where == self.origin else ConfigError(where + str(e)[len(self.origin):])


def section_from_dict(cls: type, raw: dict[str, Any], origin: str = "<dict>", prefix: str = "") -> Any:
    """One config section (e.g. ModelConfig) from a plain dict, with the same checks as a YAML file."""
    return _build(cls, raw, prefix=prefix, origin=lambda _key: origin)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (YAML/JSON-ready) of a config tree: sections as dicts, sequences as lists, as a YAML file writes
    them (version records and checkpoints store this form, and a resume compares it)."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read_yaml_tree(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if (problem := file_problem(path)) is not None:
        raise ConfigError(f"config file {path!r} {problem}")
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    with open_regular(path, ConfigError) as f:
        blob = f.read()
    try:
        data = _parse_yaml(blob.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: {e.describe()}") from None
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
        if (problem := file_problem(base_path)) is not None:  # name the including file too: the user edits that one
            raise ConfigError(f"{path}: key 'base' has value {base!r}; config file {base_path!r} {problem}")
        _deep_merge(merged, _read_yaml_tree(base_path, seen + (real,)))
    _deep_merge(merged, data)
    return merged


class _DuplicateKey(yaml.YAMLError):
    """A mapping that holds a key twice, at 1-based `line` (first at `first`); `key` is its dotted path."""

    def __init__(self, key: str, first: int, line: int):
        super().__init__(key)
        self.key, self.first, self.line = key, first, line

    def describe(self, prefix: str = "") -> str:
        """The problem in words; `prefix`: the override key the value was given for (one line: no line numbers)."""
        key = f"{prefix}.{self.key}" if prefix else self.key
        lines = "" if prefix or self.first == self.line else f" (lines {self.first} and {self.line})"
        return f"key {key!r} appears twice{lines}; YAML would silently keep the last one: remove one"


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding a key twice: safe_load keeps the last one without a word,
    so `steps:` written twice (or a whole `train:` section) would drop settings the user believes are set."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_keys(node, "", set())
        return self.construct_document(node)


def _check_keys(node: yaml.Node, key: str, done: set[int]) -> None:
    if id(node) in done:  # aliases share nodes: each is checked once (and a recursive alias ends)
        return
    done.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{key}.{i}" if key else str(i), done)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            name = key
            # `<<: *base` merges a mapping whose keys the explicit ones may override: that is no duplicate.
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                name = f"{key}.{k.value}" if key else k.value
                if (k.tag, k.value) in first:
                    raise _DuplicateKey(name, first[k.tag, k.value], k.start_mark.line + 1)
                first[k.tag, k.value] = k.start_mark.line + 1
            _check_keys(v, name, done)


def _parse_yaml(text: str) -> Any:
    loader = _StrictLoader(text)  # what yaml.safe_load does, with the duplicate-key check
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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


def _build(cls: type, raw: Any, prefix: str, origin: Callable[[str], str]) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"{origin(section)}: key {section or '<root>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be ints or null too
    if unknown:
        key = prefix + str(unknown[0])
        section = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{origin(key)}: unknown key {key!r} (known keys under {section}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and value is None:
            value = {}  # a section key with nothing under it (`model:`) keeps the section's defaults
        kwargs[name] = _coerce(value, hint, prefix + name, origin)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        return "list"  # what the user writes; the config holds it as a tuple
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------------------------------
# Coercion: a YAML value checked against (and converted to) a field's type
# --------------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The value does not fit the type; `expected` (if given) replaces the type's name in the message."""

    def __init__(self, expected: str | None = None):
        super().__init__(expected)
        self.expected = expected


def _coerce(value: Any, hint: Any, key: str, origin: Callable[[str], str]) -> Any:
    """`value` as type `hint`, or a ConfigError naming who set `key`, the value and the expected type."""
    try:
        return _convert(value, hint, key, origin)
    except _Mismatch as e:
        expected = e.expected or _type_name(hint)
        raise ConfigError(f"{origin(key)}: key {key!r} has value {value!r}; expected {expected}") from None


def _convert(value: Any, hint: Any, key: str, origin: Callable[[str], str]) -> Any:
    scalar = _SCALARS.get(hint)
    if scalar is not None:
        return scalar(value)
    structure = _STRUCTURES.get(typing.get_origin(hint))
    if structure is not None:
        return structure(value, hint, key, origin)
    if dataclasses.is_dataclass(hint):  # a list item that is a section: `data.sources.0.`
        return _build(hint, value, key + ".", origin)
    raise _Mismatch()


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch()


def _as_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Mismatch()


def _as_float(value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
    # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean a number.
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise _Mismatch()
    if not math.isfinite(number):  # .inf / .nan would only surface as a diverged run, much later
        raise _Mismatch("a finite number")
    return number


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Mismatch()


def _as_null(value: Any) -> None:
    if value is None:
        return None
    raise _Mismatch()


# Scalar types: hint -> checker returning the value as that type (or raising _Mismatch).
_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
    type(None): _as_null,
    Any: as_tuples,  # taken as written, its lists frozen into tuples (mesh rules: [name, [axes]])
}


def _union(value: Any, hint: Any, key: str, origin: Callable[[str], str]) -> Any:
    for arg in typing.get_args(hint):  # the first member type that takes the value
        try:
            return _coerce(value, arg, key, origin)
        except ConfigError:
            continue
    raise _Mismatch()


def _literal(value: Any, hint: Any, key: str, origin: Callable[[str], str]) -> Any:
    choices = typing.get_args(hint)
    # YAML 1.1 reads a bare on/off as a bool; take the user at their word for on/off choices.
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        return "on" if value else "off"
    if value in choices and not isinstance(value, bool):
        return value
    raise _Mismatch()


def _sequence(value: Any, hint: Any, key: str, origin: Callable[[str], str]) -> tuple[Any, ...] | list[Any]:
    """A YAML list as `tuple[item, ...]` (or `list[item]`); items are named `key.i` if sections, else `key[i]`."""
    if not isinstance(value, list):
        raise _Mismatch()
    item = typing.get_args(hint)[0]
    sections = dataclasses.is_dataclass(item)
    items = [_coerce(v, item, f"{key}.{i}" if sections else f"{key}[{i}]", origin) for i, v in enumerate(value)]
    return tuple(items) if typing.get_origin(hint) is tuple else items


# Structural types, by typing.get_origin(hint): hint -> checker of the value against it.
_STRUCTURES: dict[Any, Callable[[Any, Any, str, Callable[[str], str]], Any]] = {
    typing.Union: _union,
    types.UnionType: _union,
    Literal: _literal,
    tuple: _sequence,
    list: _sequence,
}
