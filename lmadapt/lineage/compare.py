"""What changed from one version to another: its config, its data sources and, per layer, its params
(`tools/lineage.py diff`).

    for key, old, new in config_changes(lineage.record("a"), lineage.record("b")): ...
    layer_changes(lineage.load_params("a", scan_layers=False), lineage.load_params("b", scan_layers=False))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

UNSET = "<unset>"  # the value of a config key one of the two versions does not have


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": value}; a leaf that is not a dict is its own value."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every run-config key whose value differs between records `a` and `b`,
    by key; a key one of them lacks has the value `UNSET` there."""
    fa, fb = flat_config(a.get("config", {})), flat_config(b.get("config", {}))
    return [(k, fa.get(k, UNSET), fb.get(k, UNSET)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def source_changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(mark, name, weight in b) per data source of records `a` or `b`, by name. The mark: "+" only in b,
    "-" only in a, "~" in both with different files or contents (fingerprints), "=" the same in both."""
    sa, sb = a.get("data", {}).get("sources", {}), b.get("data", {}).get("sources", {})
    out = []
    for name in sorted(set(sa) | set(sb)):
        if name not in sa:
            mark = "+"
        elif name not in sb:
            mark = "-"
        else:
            mark = "~" if sa[name].get("fingerprint") != sb[name].get("fingerprint") else "="
        out.append((mark, name, sb.get(name, {}).get("weight")))
    return out


def layer_changes(a: Any, b: Any) -> dict[str, float] | None:
    """||b - a|| / ||a|| per top-level module (embed, layers_i, ..., in model order) of two params trees in the
    unstacked layout, in float64; None when the trees differ in paths or shapes (other architectures)."""
    flat_a, flat_b = _by_path(a), _by_path(b)
    if set(flat_a) != set(flat_b) or any(flat_a[k].shape != flat_b[k].shape for k in flat_a):
        return None
    groups: dict[str, list[float]] = {}
    for k in flat_a:
        x, y = flat_a[k].astype(np.float64), flat_b[k].astype(np.float64)
        g = groups.setdefault(k.split("/")[0], [0.0, 0.0])  # per top-level module: embed, layers_i, ...
        g[0] += float(np.sum((y - x) ** 2))
        g[1] += float(np.sum(x**2))
    # The floor: a module all zeros in `a` (zero-initialised biases) would divide by zero.
    return {name: float(np.sqrt(num) / max(np.sqrt(den), 1e-30))
            for name, (num, den) in sorted(groups.items(), key=lambda item: _model_order(item[0]))}


def _by_path(tree: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _model_order(name: str) -> tuple[int, int, str]:
    """Embeddings, then layers by number (layers_10 after layers_9), then the rest (norm, head) by name."""
    if name.startswith("layers_"):
        return (1, int(name.split("_")[1]), name)
    return (0 if name in ("embed", "pos_embed") else 2, 0, name)
