"""Plain safetensors dumps of lmadapt params, keyed by "/"-joined leaf paths (not a Hugging Face layout)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from lmadapt.hf.common import DTYPES, HFError


def save_safetensors_dump(path: str, params: Any, dtype: str | None = None) -> str:
    """Write params (any layout) as one safetensors file keyed by "/"-joined paths ("layers_0/attn/q/kernel").

    dtype None keeps each leaf's dtype (the round trip is then exact); "float32"/"bfloat16" casts every leaf.
    """
    if dtype is not None and dtype not in DTYPES:
        raise HFError(f"dump dtype {dtype!r}: expected None or one of {sorted(DTYPES)}")
    target = (lambda x: x) if dtype is None else (lambda x: x.astype(DTYPES[dtype]))
    flat = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(nn.unbox(params))):
        name = jax.tree_util.keystr(keys, simple=True, separator="/")
        if name.count("/") != len(keys) - 1:  # a "/" inside a name would split differently on load
            raise HFError(f"param {name!r}: a name contains '/', the dump's separator")
        flat[name] = np.ascontiguousarray(target(np.asarray(leaf)))
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata={"format": "lmadapt-params"})
    os.replace(tmp, path)
    return path


def load_safetensors_dump(path: str) -> dict[str, Any]:
    """The nested numpy params tree written by `save_safetensors_dump`."""
    params: dict[str, Any] = {}
    for name, value in load_file(path).items():
        node = params
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
