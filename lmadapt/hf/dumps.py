"""Plain safetensors dumps of lmadapt params, keyed by "/"-joined leaf paths (not a Hugging Face layout)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from lmadapt.hf.common import DTYPES, HFError, check_new_file


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
    path = check_new_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": "lmadapt-params"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the dump private
        try:
            os.link(tmp, path)  # unlike rename, fails if something appeared at `path` meanwhile
        except FileExistsError:
            raise HFError(f"{path}: exists; refusing to overwrite") from None
        except OSError:  # a file system without hard links
            os.replace(tmp, check_new_file(path))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
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
