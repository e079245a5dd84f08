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

from lmadapt.continual.method import Layout, Penalty, TokenTerm
from lmadapt.continual.strategy import Strategy
from lmadapt.data.batch import Batch
from lmadapt.model import forward


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any  # the model's params, or a continual method's layout of them (LoRA: {"base", "lora"})
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key, split once per step
    ref: Any = dataclasses.field(default_factory=dict)  # constants of the strategy: {method name: its Ref}
    skipped: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))  # non-finite steps
    ema: Any = None  # continual.average.ema: a float32 moving average of the params (what the run publishes)

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


# A pytree whose `ema` node exists only when there is one: Orbax saves empty nodes too (a None field would be
# an "ema" entry in the checkpoint tree), so checkpoints of runs without an EMA keep the tree they had before.
_FIELDS = ("step", "params", "opt_state", "rng", "ref", "skipped")


def _flatten(state: TrainState) -> tuple[list[tuple[Any, Any]], bool]:
    names = _FIELDS if state.ema is None else (*_FIELDS, "ema")
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], state.ema is not None


def _unflatten(has_ema: bool, children: Any) -> TrainState:
    return TrainState(*children) if has_ema else TrainState(*children, ema=None)


jax.tree_util.register_pytree_with_keys(TrainState, _flatten, _unflatten)


def ema_start(params: Any) -> Any:
    """The EMA at step 0: the start params, in float32 (in bfloat16 the small (1 - decay) share of an update
    would round away)."""
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def final_params(state: TrainState) -> Any:
    """The trainable params a finished run publishes: its EMA in the params' dtypes when it keeps one."""
    if state.ema is None:
        return state.params
    return jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema, state.params)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises (static: changing it recompiles). With the methods of lmadapt/continual/:

    total = data_weight * CE                                     mean over the real (mask=1) tokens
            + token terms:  distill  weight * T^2 * KL(teacher_T || model_T)           (same mean)
            + penalties:    l2sp     (lambda / 2) ||theta - theta*||^2
                            ewc      (lambda / 2) sum F (theta - theta*)^2             (once per step)

    theta is the model's params: under a layout (LoRA) the adapters merged into the frozen base. Leaves where
    `trainable` (bools shaped like the params: `ParamGroups.trainable`) is False get no gradient at all.
    """

    data_weight: float = 1.0
    token_terms: tuple[TokenTerm, ...] = ()
    penalties: tuple[Penalty, ...] = ()
    layout: Layout | None = None
    trainable: Any = None  # None: every leaf trains

    @classmethod
    def of(cls, strategy: Strategy, trainable: Any = None) -> Objective:
        """The objective of a strategy's methods; `trainable` None when every leaf trains."""
        weight = 1.0
        for t in strategy.token_terms:
            weight *= t.data_weight
        return cls(data_weight=weight, token_terms=strategy.token_terms, penalties=strategy.penalties,
                   layout=strategy.layout, trainable=trainable)

    def effective_params(self, params: Any) -> Any:
        """The model's params: the layout's (LoRA adapters merged into the base) when there is one."""
        return params if self.layout is None else self.layout.effective(params)

    @property
    def sums(self) -> tuple[str, ...]:
        """The per-token sums a step accumulates: ce, tokens, then the token terms' (reported as means)."""
        return ("ce", "tokens", *(k for t in self.token_terms for k in t.sums))


def init_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
               *, boxed: bool = False, ref: Any = None, ema: bool = False) -> TrainState:
    """A fresh state, with the strategy's constants `ref` (a fresh student's teacher) and, with `ema`, an EMA
    of the params. With `boxed=True` the params keep their `nn.Partitioned` logical names, which is what
    `jax.eval_shape` callers want for deriving shardings (the optimizer moments inherit them)."""
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(init_rng, dummy)["params"]
    if not boxed:
        params = nn.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                      ref={} if ref is None else ref, ema=ema_start(params) if ema else None)


def start_state(params: Any, ref: Any, rng: jax.Array, *, strategy: Strategy, tx: optax.GradientTransformation,
                opt_state: Any = None, ema: bool = False) -> TrainState:
    """Step-0 state around a start version's params: the strategy's layout of them (LoRA adapters with B = 0,
    so the function is unchanged), a fresh (or carried) optimizer state, the strategy's constants and, with
    `ema`, an EMA starting at the start params."""
    init_rng, state_rng = jax.random.split(rng)
    params = strategy.wrap(params, init_rng)
    opt_state = tx.init(params) if opt_state is None else opt_state
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng, ref=ref,
                      ema=ema_start(params) if ema else None)


def token_loss_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of masked next-token cross-entropies and the number of counted tokens (both float32)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def loss_sums(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Forward pass on one (micro)batch: (sum of token losses, token count)."""
    return token_loss_sums(forward(params, model, batch), batch["targets"], batch["loss_mask"])


def data_objective(params: Any, ref: Any, batch: Batch, model: nn.Module, obj: Objective
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token part of the objective on one (micro)batch, as a sum: (total, {ce, tokens, the terms' sums})."""
    if obj.trainable is not None:
        # Frozen leaves get no gradient, so XLA skips their weight-gradient matmuls altogether.
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, obj.trainable)
    logits = forward(obj.effective_params(params), model, batch)
    ce_sum, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
    total, sums = obj.data_weight * ce_sum, {"ce": ce_sum, "tokens": n}
    for t in obj.token_terms:
        added, term_sums = t.term(logits, batch, ref[t.name])
        total = total + added
        sums.update(term_sums)
    return total, sums


def penalty(params: Any, ref: Any, obj: Objective) -> jax.Array:
    """The penalties on the model's params theta, each against its method's ref (e.g. the anchor theta*)."""
    out = jnp.zeros((), jnp.float32)
    if obj.penalties:
        theta = obj.effective_params(params)
        for p in obj.penalties:
            out = out + p.penalty(theta, ref[p.name])
    return out


def _split_microbatches(batch: Batch, k: int) -> Batch:
    # Microbatch i takes rows i, i+k, i+2k, ...: a strided split keeps every microbatch spread over
    # all data-parallel devices (a contiguous split would put microbatch 0 on the first devices only).
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, microbatches: int = 1, objective: Objective = Objective(),
               ema_decay: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch, accumulating gradients over `microbatches` parts.

    A step whose loss, penalty or gradients are not finite leaves params, optimizer state and EMA as they
    were, counts itself in `state.skipped` and says which leaves were bad in `nonfinite_leaves`. When the
    state keeps an EMA, an applied update is followed by ema = ema_decay * ema + (1 - ema_decay) * params.

    The per-token objective is the mean over real (mask=1) tokens of the whole global batch: gradients
    of its *sums* are accumulated and divided once by the total count, so k microbatches give exactly
    the update of one batch k times the size. The regularisers are added once per step.
    """
    grad_fn = jax.value_and_grad(data_objective, has_aux=True)

    if microbatches == 1:
        (total, sums), grads = grad_fn(state.params, state.ref, batch, model, objective)
    else:
        def accumulate(carry, micro):
            g_acc, t_acc, s_acc = carry
            (t, s), g = grad_fn(state.params, state.ref, micro, model, objective)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, t_acc + t, {k: s_acc[k] + s[k] for k in s_acc}), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in objective.sums})
        (grads, total, sums), _ = jax.lax.scan(accumulate, init, _split_microbatches(batch, microbatches))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    n_tokens = sums["tokens"]
    denom = jnp.maximum(n_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    reg = jnp.zeros((), jnp.float32)
    if objective.penalties:
        reg, reg_grads = jax.value_and_grad(penalty)(state.params, state.ref, objective)
        grads = jax.tree.map(jnp.add, grads, reg_grads)
    # A non-finite loss or gradient must not reach the params or the Adam moments (one NaN there is
    # permanent). A conditional, not a select of new vs old state: with a select XLA keeps the old
    # moments alive beside the new ones (+8 bytes/param, measured); under `cond` the update stays in place.
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(total) & jnp.isfinite(reg) & jnp.all(leaf_finite)

    def apply(grads, opt_state, params, ema):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:  # inside the cond: a skipped step does not pull the average either
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p.astype(jnp.float32), ema, params)
        return params, opt_state, ema

    params, opt_state, ema = jax.lax.cond(finite, apply, lambda g, o, p, e: (p, o, e), grads, state.opt_state,
                                          state.params, state.ema)
    rng, _ = jax.random.split(state.rng)

    metrics = {
        "loss": sums["ce"] / denom,
        "objective": total / denom + reg,
        "tokens": n_tokens,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "skipped": state.skipped + (~finite).astype(jnp.int32),
        "nonfinite_leaves": ~leaf_finite,  # per leaf of params (tree order); not logged, read by the trainer
    }
    for k in objective.sums[2:]:  # the token terms' own sums (distill: kl), as means
        metrics[k] = sums[k] / denom
    if objective.penalties:
        metrics["penalty"] = reg
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                              skipped=metrics["skipped"], ema=ema)
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, objective: Objective = Objective()
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) on a held-out batch; callers add these up over batches."""
    return loss_sums(objective.effective_params(params), model, batch)
