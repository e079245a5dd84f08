"""Reading one value of config.json: typed, range-checked, refused in one line naming the key."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from typing import Any

from lmadapt.hf.common import HFError

_MISSING = object()
_short = reprlib.Repr()
_short.maxstring, _short.maxlist, _short.maxother = 40, 6, 40


def short(value: Any) -> str:
    """A repr of a config value short enough for a one-line error."""
    return _short.repr(value)


def refuse(key: str, value: Any, expected: str) -> HFError:
    """The one-line error for a config.json option lmadapt does not implement (returned, for `raise`)."""
    return HFError(f"config.json: {key}={_short.repr(value)} is not supported (expected {expected})")


def number(hf: Mapping[str, Any], key: str, kind: type = int, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """hf[key] as a positive int/float. Missing or null takes `default` (transformers' class default); without
    one it is an error, as is anything but a positive finite number (an int below 2**31 for sizes)."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise HFError(f"config.json: missing {prefix + key!r}")
        return default
    # JSON allows NaN and Infinity (json.load reads them), and sizes feed int32 shapes and indices.
    if (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            or (isinstance(value, float) and not math.isfinite(value))
            or (kind is int and (value % 1 or value >= 2**31))):
        what = "integer below 2**31" if kind is int else "finite number"
        raise HFError(f"config.json: {prefix}{key}={value!r} is not a positive {what}")
    return kind(value)


def optional_number(hf: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """Like `number`, but an explicit null means "off" (a window or a softcap); only a missing key takes the
    default."""
    if key not in hf:
        return default
    return None if hf[key] is None else number(hf, key, kind)


def flag(hf: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """hf[key] as a boolean (missing or null: `default`); anything but true/false is refused."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HFError(f"config.json: {key}={_short.repr(value)} is not true or false")
    return value


def require(hf: Mapping[str, Any], key: str, ok: bool, expected: str) -> None:
    """Refuse `key` unless `ok` (the option is at a value lmadapt implements)."""
    if not ok:
        raise refuse(key, hf.get(key), expected)
