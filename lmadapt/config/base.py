"""What every config section is built on: the one-line ConfigError, and frozen sections whose sequences are tuples."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file, the key, the value and what was expected."""


def as_tuples(value: Any) -> Any:
    """`value` with every list in it (nested ones too) a tuple: the frozen form a config holds for a sequence."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def as_lists(value: Any) -> Any:
    """The inverse of `as_tuples`: every tuple a list, the form a user writes in YAML (and error messages show)."""
    return [as_lists(v) for v in value] if isinstance(value, list | tuple) else value


class _Frozen:
    """Base of every (frozen) section: a list given for a sequence field by Python code (the YAML loader builds
    tuples) is stored as a tuple, so `DataConfig(sources=[src])` equals, and hashes as, `DataConfig(sources=(src,))`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, f.name, as_tuples(value))  # frozen: __setattr__ itself refuses
