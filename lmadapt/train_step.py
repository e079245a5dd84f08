"""The training step: a pure function `train_step(state, batch) -> (state, metrics)`.

Read top to bottom: the state, the loss, the step. Nothing here touches files, devices or the mesh;
`trainer.py` jits these functions with explicit shardings and donates the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from lmadapt.continual import fisher, lora

Batch = dict[str, jax.Array]  # tokens, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] float32


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any  # the model's params, or {"base": ..., "lora": ...} with LoRA adapters
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key, split once per step
    ref: Any = struct.field(default_factory=dict)  # constants of the strategy: anchor, fisher, teacher
    skipped: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))  # non-finite steps so far


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises besides the data loss (static: changing it recompiles).

    total = data_weight * CE + distill_weight * T^2 * KL(teacher_T || model_T)   (mean over real tokens)
            + (l2sp / 2) ||theta - theta*||^2 + (ewc / 2) sum F (theta - theta*)^2
    """

    data_weight: float = 1.0
    distill_weight: float = 0.0
    temperature: float = 2.0
    l2sp: float = 0.0
    ewc: float = 0.0
    lora_scale: float | None = None  # set: params are {"base", "lora"}, merged before the forward pass
    trainable: tuple[bool, ...] | None = None  # per leaf of params (tree order); False: no gradient at all
    teacher: nn.Module | None = None

    def effective_params(self, params: Any) -> Any:
        """The model's params: LoRA adapters merged into the base when present."""
        if self.lora_scale is None:
            return params
        return lora.merge(params["base"], params["lora"], self.lora_scale)


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


def token_loss_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of masked next-token cross-entropies and the number of counted tokens (both float32)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def forward(params: Any, model: nn.Module, batch: Batch) -> jax.Array:
    return model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"])


def loss_sums(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Forward pass on one (micro)batch: (sum of token losses, token count)."""
    return token_loss_sums(forward(params, model, batch), batch["targets"], batch["loss_mask"])


def kl_sums(teacher_logits: jax.Array, logits: jax.Array, temperature: float, loss_mask: jax.Array) -> jax.Array:
    """Sum over real tokens of KL(softmax(teacher / T) || softmax(model / T))."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return jnp.sum(kl * loss_mask.astype(jnp.float32))


def data_objective(params: Any, ref: Any, batch: Batch, model: nn.Module, obj: Objective
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Per-token part of the objective on one (micro)batch, as a sum: (total, (ce_sum, kl_sum, tokens))."""
    if obj.trainable is not None:
        # Frozen leaves get no gradient, so XLA skips their weight-gradient matmuls altogether.
        leaves, treedef = jax.tree.flatten(params)
        params = treedef.unflatten([p if t else jax.lax.stop_gradient(p) for p, t in zip(leaves, obj.trainable,
                                                                                           strict=True)])
    logits = forward(obj.effective_params(params), model, batch)
    ce_sum, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
    total = obj.data_weight * ce_sum
    kl_sum = jnp.zeros((), jnp.float32)
    if obj.distill_weight:
        teacher_logits = jax.lax.stop_gradient(forward(ref["teacher"], obj.teacher, batch))
        kl_sum = kl_sums(teacher_logits, logits, obj.temperature, batch["loss_mask"])
        total = total + obj.distill_weight * obj.temperature**2 * kl_sum
    return total, (ce_sum, kl_sum, n)


def penalty(params: Any, ref: Any, obj: Objective) -> jax.Array:
    """Regularisers toward the parent version (anchor theta*): L2-SP and EWC."""
    out = jnp.zeros((), jnp.float32)
    if obj.l2sp or obj.ewc:
        theta = obj.effective_params(params)
        if obj.l2sp:
            out = out + fisher.l2sp_penalty(theta, ref["anchor"], obj.l2sp)
        if obj.ewc:
            out = out + fisher.ewc_penalty(theta, ref["anchor"], ref["fisher"], obj.ewc)
    return out


def _split_microbatches(batch: Batch, k: int) -> Batch:
    # Microbatch i takes rows i, i+k, i+2k, ...: a strided split keeps every microbatch spread over
    # all data-parallel devices (a contiguous split would put microbatch 0 on the first devices only).
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, microbatches: int = 1, objective: Objective = Objective()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch, accumulating gradients over `microbatches` parts.

    A step whose loss, penalty or gradients are not finite leaves params and optimizer state as they
    were, counts itself in `state.skipped` and says which leaves were bad in `nonfinite_leaves`.

    The per-token objective is the mean over real (mask=1) tokens of the whole global batch: gradients
    of its *sums* are accumulated and divided once by the total count, so k microbatches give exactly
    the update of one batch k times the size. The regularisers are added once per step.
    """
    grad_fn = jax.value_and_grad(data_objective, has_aux=True)

    if microbatches == 1:
        (total, (ce_sum, kl_sum, n_tokens)), grads = grad_fn(state.params, state.ref, batch, model, objective)
    else:
        def accumulate(carry, micro):
            g_acc, sums = carry
            (t, (ce, kl, n)), g = grad_fn(state.params, state.ref, micro, model, objective)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, tuple(a + b for a, b in zip(sums, (t, ce, kl, n), strict=True))), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, tuple(jnp.zeros((), jnp.float32) for _ in range(4)))
        (grads, (total, ce_sum, kl_sum, n_tokens)), _ = jax.lax.scan(
            accumulate, init, _split_microbatches(batch, microbatches))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    denom = jnp.maximum(n_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    reg = jnp.zeros((), jnp.float32)
    if objective.l2sp or objective.ewc:
        reg, reg_grads = jax.value_and_grad(penalty)(state.params, state.ref, objective)
        grads = jax.tree.map(jnp.add, grads, reg_grads)
    # A non-finite loss or gradient must not reach the params or the Adam moments (one NaN there is
    # permanent). A conditional, not a select of new vs old state: with a select XLA keeps the old
    # moments alive beside the new ones (+8 bytes/param, measured); under `cond` the update stays in place.
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(total) & jnp.isfinite(reg) & jnp.all(leaf_finite)

    def apply(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply, lambda g, o, p: (p, o), grads, state.opt_state, state.params)
    rng, _ = jax.random.split(state.rng)

    metrics = {
        "loss": ce_sum / denom,
        "objective": total / denom + reg,
        "tokens": n_tokens,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "skipped": state.skipped + (~finite).astype(jnp.int32),
        "nonfinite_leaves": ~leaf_finite,  # per leaf of params (tree order); not logged, read by the trainer
    }
    if objective.distill_weight:
        metrics["kl"] = kl_sum / denom
    if objective.l2sp or objective.ewc:
        metrics["penalty"] = reg
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                              skipped=metrics["skipped"])
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, objective: Objective = Objective()
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) on a held-out batch; callers add these up over batches."""
    return loss_sums(objective.effective_params(params), model, batch)
