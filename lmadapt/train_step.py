"""The training step: a pure function `train_step(state, batch) -> (state, metrics)`.

Read top to bottom: the state, the loss, the step. Nothing here touches files, devices or the mesh;
`trainer.py` jits these functions with explicit shardings and donates the state.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

Batch = dict[str, jax.Array]  # tokens, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] float32


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key, split once per step


def init_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
               *, boxed: bool = False) -> TrainState:
    """A fresh state. With `boxed=True` the params keep their `nn.Partitioned` logical names, which is
    what `jax.eval_shape` callers want for deriving shardings (the optimizer moments inherit them)."""
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(init_rng, dummy)["params"]
    if not boxed:
        params = nn.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def state_from_params(params: Any, rng: jax.Array, tx: optax.GradientTransformation) -> TrainState:
    """A state at step 0 around given params (a run started from a model version): fresh optimizer state."""
    _, state_rng = jax.random.split(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def token_loss_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of masked next-token cross-entropies and the number of counted tokens (both float32)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def loss_sums(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Forward pass on one (micro)batch: (sum of token losses, token count)."""
    logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    return token_loss_sums(logits, batch["targets"], batch["loss_mask"])


def _split_microbatches(batch: Batch, k: int) -> Batch:
    # Microbatch i takes rows i, i+k, i+2k, ...: a strided split keeps every microbatch spread over
    # all data-parallel devices (a contiguous split would put microbatch 0 on the first devices only).
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, microbatches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch, accumulating gradients over `microbatches` parts.

    The loss is the mean over real (mask=1) tokens of the whole global batch: gradients of the token
    loss *sums* are accumulated and divided once by the total count, so k microbatches give exactly the
    update of one batch k times the size.
    """
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    if microbatches == 1:
        (loss_sum, n_tokens), grads = grad_fn(state.params, model, batch)
    else:
        def accumulate(carry, micro):
            g_acc, l_acc, n_acc = carry
            (loss, n), g = grad_fn(state.params, model, micro)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + loss, n_acc + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, n_tokens), _ = jax.lax.scan(accumulate, init, _split_microbatches(batch, microbatches))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    denom = jnp.maximum(n_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)

    metrics = {
        "loss": loss_sum / denom,
        "tokens": n_tokens,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) on a held-out batch; callers add these up over batches."""
    return loss_sums(params, model, batch)
