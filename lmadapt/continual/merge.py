"""Merging model versions' params: linear interpolation and (weighted) model-soup averaging.

Pure functions on params trees (plain arrays or boxed `nn.Partitioned` leaves; boxes are kept). Arithmetic is in
float32 and each result leaf is cast back to the dtype of the corresponding leaf of the *first* tree, so merging
bfloat16 params gives bfloat16 params. Leaves are expected to be floating point (params are).

    merged = interpolate(params_v1, params_v2, 0.3)          # 0.7 * v1 + 0.3 * v2
    soup = average([params_a, params_b, params_c], [2, 1, 1])  # weights are normalised to sum to 1

Trees must have the same structure and leaf shapes; otherwise a `ValueError` names the first mismatching path.

`publish_merge` and `publish_interpolation` do the same to versions of a lineage and publish the result as a new
version whose parents are the sources (`tools/lineage.py merge / interpolate`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from lmadapt.lineage.store import Lineage

__all__ = ["average", "check_compatible", "interpolate", "publish_interpolation", "publish_merge"]


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_compatible(a: Any, b: Any, *, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise `ValueError` naming the first path where trees `a` and `b` differ in structure or leaf shape.

    Paths are compared in flattening order (dict keys sorted); the message says which tree lacks the path, or
    both shapes when the shapes differ.
    """
    leaves_a, treedef_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, treedef_b = jax.tree_util.tree_flatten_with_path(b)
    paths_a, paths_b = [p for p, _ in leaves_a], [p for p, _ in leaves_b]
    if paths_a != paths_b:
        set_a, set_b = set(paths_a), set(paths_b)
        # At the first position where the flattened path lists disagree, report whichever path the other tree
        # lacks. (Both present means the same leaves in another order: a container-type difference, below.)
        for path_a, path_b in itertools.zip_longest(paths_a, paths_b):
            if path_a == path_b:
                continue
            if path_a is not None and path_a not in set_b:
                raise ValueError(f"params trees differ in structure at {_path_str(path_a)}: present in "
                                 f"{names[0]}, missing in {names[1]}")
            if path_b is not None and path_b not in set_a:
                raise ValueError(f"params trees differ in structure at {_path_str(path_b)}: present in "
                                 f"{names[1]}, missing in {names[0]}")
            break
    else:
        for (path, leaf_a), (_, leaf_b) in zip(leaves_a, leaves_b, strict=True):
            shape_a, shape_b = jnp.shape(leaf_a), jnp.shape(leaf_b)
            if shape_a != shape_b:
                raise ValueError(f"params trees differ in shape at {_path_str(path)}: {names[0]} has {shape_a}, "
                                 f"{names[1]} has {shape_b}")
    if treedef_a != treedef_b:  # same paths and shapes but different node types (e.g. a box vs a plain array)
        raise ValueError(f"params trees differ in container types: {treedef_a} vs {treedef_b}")


def interpolate(a: Any, b: Any, alpha: float | jax.Array) -> Any:
    """(1 - alpha) * a + alpha * b, leafwise, in float32, cast back to `a`'s dtypes.

    alpha = 0 returns `a`'s values exactly and alpha = 1 returns `b`'s values exactly (when they fit `a`'s dtype).
    `alpha` may be a traced scalar (the function is jit-friendly); values outside [0, 1] extrapolate.
    """
    check_compatible(a, b)
    alpha32 = jnp.asarray(alpha, jnp.float32)

    def mix(x: jax.Array, y: jax.Array) -> jax.Array:
        x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        return ((1.0 - alpha32) * x32 + alpha32 * y32).astype(jnp.result_type(x))

    return jax.tree.map(mix, a, b)


def average(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Weighted average of params trees (a "model soup"): sum_i w_i * tree_i / sum_i w_i, in float32.

    weights: one non-negative number per tree with a positive sum (normalised here); None averages uniformly.
    The result has the first tree's dtypes. Raises `ValueError` on an empty list, a weight count mismatch, bad
    weights, or trees that differ in structure or shape (naming the first differing path and the tree index).
    """
    if not trees:
        raise ValueError("average needs at least one params tree")
    if weights is None:
        weights = [1.0] * len(trees)
    if len(weights) != len(trees):
        raise ValueError(f"got {len(weights)} weights for {len(trees)} params trees")
    weights = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and have a positive sum, got {weights}")
    for i, tree in enumerate(trees[1:], start=1):
        check_compatible(trees[0], tree, names=("trees[0]", f"trees[{i}]"))
    total = sum(weights)
    normalised = [w / total for w in weights]

    def mix(*leaves: jax.Array) -> jax.Array:
        acc = sum(jnp.float32(w) * jnp.asarray(x, jnp.float32) for w, x in zip(normalised, leaves, strict=True))
        return acc.astype(jnp.result_type(leaves[0]))

    return jax.tree.map(mix, *trees)


def publish_merge(lineage: Lineage, sources: Sequence[str], new_id: str, weights: Sequence[float] | None = None, *,
                  note: str = "") -> str:
    """Publish the weighted average of versions `sources` (a model soup; `weights` as in `average`, None: equal)
    as version `new_id`, whose parents are the distinct sources, and return the note it records (`note`, else one
    naming the sources and weights).

    Raises `LineageError`, before anything is written, for an unknown source, sources of different architectures
    (runtime options such as `scan_layers` aside), bad weights or trees that do not match; `Lineage.publish`
    refuses an invalid or existing `new_id`.
    """
    return _publish_average(lineage, list(sources), None if weights is None else list(weights), new_id,
                            method="merge", note=note)


def publish_interpolation(lineage: Lineage, version: str, other: str | None, alpha: float, new_id: str, *,
                          note: str = "") -> str:
    """Publish alpha * `version` + (1 - alpha) * `other` (WiSE-FT) as version `new_id` and return its note.

    `other` None means `version`'s first parent (a `LineageError` if it has none): alpha 1 keeps `version`, 0 gives
    the parent. Otherwise as `publish_merge`, with weights [alpha, 1 - alpha] (so alpha outside [0, 1] is refused).
    """
    # Imported here: the lineage package loads the store (orbax, the model), which the tree functions do not need.
    from lmadapt.lineage.store import LineageError

    other = other or (lineage.parents(version) or [None])[0]
    if other is None:
        raise LineageError(f"version {version!r} has no parent to interpolate with; name the other version")
    return _publish_average(lineage, [version, other], [alpha, 1.0 - alpha], new_id, method="interpolate",
                            note=note)


def _publish_average(lineage: Lineage, sources: list[str], weights: list[float] | None, new_id: str, *,
                     method: str, note: str) -> str:
    """The merge of `sources`, recorded as strategy {"kind": "merge", "method": method, ...}; returns the note."""
    from lmadapt.lineage.store import LineageError
    from lmadapt.model import per_layer

    # Compare and publish in the per-layer layout: how each source was trained (scanned or not) does not matter.
    models = [per_layer(lineage.model_config(v)) for v in sources]
    if any(m != models[0] for m in models):
        raise LineageError(f"versions {sources} have different architectures and cannot be merged")
    trees = [lineage.load_params(v, scan_layers=False) for v in sources]
    try:
        params = average(trees, weights)
    except ValueError as e:
        raise LineageError(str(e)) from None
    note = note or f"{method} of {', '.join(sources)} with weights {weights or 'equal'}"
    lineage.publish(new_id, params, models[0], lineage.tokenizer(sources[0]), parents=list(dict.fromkeys(sources)),
                    note=note, strategy={"kind": "merge", "method": method, "sources": sources, "weights": weights})
    return note
