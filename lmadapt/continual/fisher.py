"""Diagonal Fisher information and the EWC / L2-SP penalties for continual training.

    fisher = fisher_diagonal(params, model, batches, kind="empirical")
    fisher = accumulate_online(previous_fisher, fisher, gamma=0.9)        # online EWC across versions
    loss = task_loss + ewc_penalty(params, anchor_params, fisher, lam)    # anchor: the previous version's params

The Fisher is estimated per *sequence*: each row r of each batch contributes the squared gradient of its masked
log-likelihood, g_r = grad_theta sum_t mask_rt * log p(y_rt | x_r,<t), and F = sum_r g_r**2 / (number of rows).

Rows whose loss_mask is all zero (padding rows) have g_r = 0 exactly and are *excluded* from the row count, so
padding a last, short batch with empty rows does not dilute F.

`kind` picks the labels y:
  "empirical": the batch's `targets` (cheap, biased towards the data).
  "true": labels sampled from the model's own predictive distribution at every position (teacher forcing: the
      context is still the real tokens). Batch i (0-based, in iteration order) samples with
      `jax.random.fold_in(rng, i)` through `sample_targets(logits, key)` on the full batch's logits, so the labels
      are a pure function of (params, batch, rng, i) and can be reproduced outside.

Everything here is pure (no I/O, no mutable state). The per-batch gradient work is one jitted function, compiled
once per (model, batch shape) and shared by both kinds ("true" adds one jitted forward pass per batch). The model is
a static argument of those functions: a module built from a (frozen, hashable) ModelConfig is itself hashable, and
equal configs give equal modules, so calls with equal models reuse the compiled code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmadapt.data.batch import KEYS, Batch
from lmadapt.model import forward

__all__ = ["accumulate_online", "batch_key", "ewc_penalty", "fisher_diagonal", "l2sp_penalty", "sample_targets"]

_INPUT_KEYS = tuple(k for k in KEYS if k != "targets")  # what a batch needs for kind "true"


def sample_targets(logits: jax.Array, rng: jax.Array) -> jax.Array:
    """Labels drawn from softmax(logits) independently at every position: int32, logits.shape[:-1]."""
    return jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


def batch_key(rng: jax.Array, index: int | jax.Array) -> jax.Array:
    """The key batch `index` (0-based) samples its "true"-Fisher labels with: fold_in(rng, index)."""
    return jax.random.fold_in(rng, index)


def _log_likelihood(params: Any, model: nn.Module, row: Mapping[str, jax.Array], targets: jax.Array) -> jax.Array:
    """sum_t mask_t * log p(targets_t | context) for one row ([T] arrays), as a float32 scalar."""
    logits = forward(params, model, {k: v[None] for k, v in row.items()})[0]  # a batch of one row
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return -jnp.sum(losses * row["loss_mask"].astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("model",))
def _model_targets(params: Any, batch: Batch, key: jax.Array, *, model: nn.Module) -> jax.Array:
    """True-Fisher labels of a batch: `sample_targets` of the model's logits on the real tokens."""
    return sample_targets(forward(params, model, batch), key)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(0, 1))
def _accumulate_batch(acc: Any, n_rows: jax.Array, params: Any, batch: Batch, *,
                      model: nn.Module) -> tuple[Any, jax.Array]:
    """(acc + sum over rows of g_r**2, n_rows + rows with a counted token) for one batch; g_r via vmap(grad)."""
    per_row = jax.vmap(jax.grad(_log_likelihood), in_axes=(None, None, 0, 0))
    rows = {k: batch[k] for k in _INPUT_KEYS}
    grads = per_row(params, model, rows, batch["targets"])  # every leaf [B, *param.shape]
    acc = jax.tree.map(lambda a, g: a + jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), acc, grads)
    counted = jnp.sum(jnp.any(batch["loss_mask"] != 0, axis=-1).astype(jnp.float32))
    return acc, n_rows + counted


@jax.jit
def _zeros(params: Any) -> tuple[Any, jax.Array]:
    """A float32 zero accumulator shaped like params and a zero row count (jitted: one dispatch, not one per leaf)."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), jnp.zeros((), jnp.float32)


@jax.jit
def _divide(acc: Any, n_rows: jax.Array) -> Any:
    return jax.tree.map(lambda a: a / n_rows, acc)


def fisher_diagonal(params: Any, model: nn.Module, batches: Iterable[Batch], *,
                    kind: Literal["empirical", "true"] = "empirical", rng: jax.Array | None = None) -> Any:
    """Diagonal Fisher: mean over (non-empty) rows of all batches of the squared per-row log-likelihood gradient.

    params: boxed or plain; the result is a plain float32 tree of the same structure and shapes.
    model: a hashable linen module such as `Transformer(cfg)` (a static argument of the compiled steps).
    batches: dicts with tokens, positions, segment_ids, loss_mask ([B, T]) and, for "empirical", targets.
    kind/rng: see the module docstring; `rng` is required for "true".
    Memory: per-row gradients are materialised for a whole batch ([B, *params]); choose B accordingly.
    A driver, not itself jittable: it iterates `batches` and reads the row count back once at the end.
    Raises ValueError for an unknown kind, a missing rng, or when no batch has a row with a counted token.
    """
    if kind not in ("empirical", "true"):
        raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}")
    if kind == "true" and rng is None:
        raise ValueError("kind='true' samples labels from the model and needs an rng")
    params = nn.unbox(params)
    acc, n_rows = _zeros(params)
    keys = (*_INPUT_KEYS, "targets") if kind == "empirical" else _INPUT_KEYS
    for index, batch in enumerate(batches):
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"batch {index} lacks {missing}")
        inputs = {k: jnp.asarray(batch[k]) for k in keys}
        if kind == "true":
            inputs["targets"] = _model_targets(params, inputs, batch_key(rng, index), model=model)
        acc, n_rows = _accumulate_batch(acc, n_rows, params, inputs, model=model)
    total = float(n_rows)
    if total == 0:
        raise ValueError("fisher_diagonal got no row with a nonzero loss_mask (empty or fully masked batches)")
    return _divide(acc, n_rows)


def accumulate_online(previous: Any | None, current: Any, gamma: float) -> Any:
    """Online EWC: gamma * previous + current, in float32 (previous None: the current Fisher alone)."""
    if previous is None:
        return jax.tree.map(lambda c: jnp.asarray(c, jnp.float32), current)
    return jax.tree.map(lambda p, c: jnp.float32(gamma) * jnp.asarray(p, jnp.float32) + jnp.asarray(c, jnp.float32),
                        previous, current)


def _lookup(tree: Any, path: tuple[Any, ...], what: str) -> Any:
    """The subtree of `tree` at a key path from `jax.tree_util.tree_flatten_with_path`."""
    node = tree
    for entry in path:
        try:
            if isinstance(entry, jax.tree_util.DictKey):
                node = node[entry.key]
            elif isinstance(entry, jax.tree_util.SequenceKey):
                node = node[entry.idx]
            elif isinstance(entry, jax.tree_util.GetAttrKey):
                node = getattr(node, entry.name)
            else:
                raise TypeError(f"unsupported key {entry!r}")
        except (KeyError, IndexError, AttributeError, TypeError) as err:
            raise ValueError(f"{what} has no leaf at {jax.tree_util.keystr(path)}") from err
    return node


def _anchored_sum(params: Any, anchor: Any, weights: Any | None) -> jax.Array:
    """sum over the leaves of `anchor` of [w *] (params - anchor)**2, in float32."""
    params, anchor = nn.unbox(params), nn.unbox(anchor)
    weights = None if weights is None else nn.unbox(weights)
    terms = []  # (theta*, theta, w): every path looked up before any arithmetic
    for path, theta_star in jax.tree_util.tree_flatten_with_path(anchor)[0]:
        weight = None if weights is None else _lookup(weights, path, "fisher")
        terms.append((theta_star, _lookup(params, path, "params"), weight))
    total = jnp.zeros((), jnp.float32)
    for theta_star, theta, weight in terms:
        sq = jnp.square(jnp.asarray(theta, jnp.float32) - jnp.asarray(theta_star, jnp.float32))
        if weight is not None:
            sq = jnp.asarray(weight, jnp.float32) * sq
        total = total + jnp.sum(sq)
    return total


def ewc_penalty(params: Any, anchor: Any, fisher: Any, lam: float | jax.Array) -> jax.Array:
    """EWC: (lam / 2) * sum F * (theta - theta*)**2 over the leaves present in `anchor` (theta*), float32 scalar.

    `params` and `fisher` must have a leaf at every path of `anchor` (they may hold more, e.g. an anchor restricted
    to some layers). Its gradient w.r.t. params is lam * F * (theta - theta*).
    """
    return jnp.asarray(lam, jnp.float32) / 2 * _anchored_sum(params, anchor, fisher)


def l2sp_penalty(params: Any, anchor: Any, lam: float | jax.Array) -> jax.Array:
    """L2-SP: (lam / 2) * sum (theta - theta*)**2 over the leaves present in `anchor`, float32 scalar."""
    return jnp.asarray(lam, jnp.float32) / 2 * _anchored_sum(params, anchor, None)
