"""A run's continual-update strategy as data: the train state's layout and the step's objective.

The strategy decides (1) what the trainable params are (the model's, or a frozen base plus LoRA
adapters), (2) which constants ride along in `TrainState.ref` (the parent's params as the L2-SP/EWC
anchor, its Fisher, a distillation teacher's params), and (3) the `Objective` the train step minimises.
Everything else about the step is the same for every strategy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmadapt.config import Config, ModelConfig
from lmadapt.continual import lora
from lmadapt.model import Transformer
from lmadapt.optim import group_labels, trainable_mask
from lmadapt.train_step import Objective, TrainState, init_state


def frozen_extra(cfg: Config) -> tuple[str, ...]:
    """Named selectors frozen by the strategy itself (the base under LoRA)."""
    return ("base",) if cfg.continual.lora.rank else ()


def ref_keys(cfg: Config) -> tuple[str, ...]:
    c = cfg.continual
    keys = []
    if c.l2sp or c.ewc:
        keys.append("anchor")
    if c.ewc:
        keys.append("fisher")
    if c.distill.weight:
        keys.append("teacher")
    return tuple(keys)


def abstract_state(cfg: Config, model: Transformer, tx: optax.GradientTransformation,
                   teacher: Transformer | None) -> TrainState:
    """Shapes of the whole train state with logical names (boxed leaves): call under the mesh's rules."""
    rng = jax.random.PRNGKey(0)
    base = jax.eval_shape(functools.partial(init_state, model=model, tx=tx, seq_len=8, boxed=True), rng)
    params = base.params
    if cfg.continual.lora.rank:
        # Unboxed inside the trace: unboxing abstract values eagerly would apply sharding constraints.
        adapters = jax.eval_shape(lambda p, r: lora.init_lora(nn.unbox(p), cfg.continual.lora.targets,
                                                              cfg.continual.lora.rank, r), base.params, rng)
        params = {"base": base.params, "lora": adapters}
    opt_state = jax.eval_shape(tx.init, params) if params is not base.params else base.opt_state
    ref: dict[str, Any] = {}
    for key in ref_keys(cfg):
        if key == "teacher":
            assert teacher is not None
            ref[key] = jax.eval_shape(lambda r: teacher.init(r, jnp.zeros((1, 8), jnp.int32))["params"], rng)
        else:
            ref[key] = base.params
    return TrainState(step=base.step, params=params, opt_state=opt_state, rng=base.rng, ref=ref)


def make_objective(cfg: Config, params: Any, teacher: Transformer | None) -> Objective:
    """The step's objective for `cfg`; `params` (plain or boxed shapes) fixes which leaves are trainable."""
    c = cfg.continual
    labels = group_labels(params, cfg.optimizer.groups, frozen_extra(cfg))
    mask = trainable_mask(labels, cfg.optimizer.groups)
    trainable = tuple(jax.tree.leaves(mask))
    return Objective(
        data_weight=c.distill.data_weight if c.distill.weight else 1.0,
        distill_weight=c.distill.weight, temperature=c.distill.temperature, l2sp=c.l2sp, ewc=c.ewc,
        lora_scale=lora.lora_scale(c.lora.alpha, c.lora.rank) if c.lora.rank else None,
        trainable=None if all(trainable) else trainable, teacher=teacher)


def start_state(base_params: Any, ref: Any, rng: jax.Array, *, cfg: Config, tx: optax.GradientTransformation,
                opt_state: Any = None) -> TrainState:
    """Step-0 state around a version's params: adapters added under LoRA (B = 0, so the function is
    unchanged), a fresh (or carried) optimizer state, and the strategy's constants."""
    init_rng, state_rng = jax.random.split(rng)
    params = base_params
    if cfg.continual.lora.rank:
        params = {"base": base_params, "lora": lora.init_lora(base_params, cfg.continual.lora.targets,
                                                              cfg.continual.lora.rank, init_rng)}
    opt_state = tx.init(params) if opt_state is None else opt_state
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng, ref=ref)


def publishable(state: TrainState, objective: Objective) -> tuple[Any, dict[str, Any]]:
    """(params of the new version, artifacts): LoRA runs publish merged params plus their adapters."""
    if objective.lora_scale is None:
        return state.params, {}
    return objective.effective_params(state.params), {"lora": state.params["lora"]}


def describe(cfg: Config, table: list[dict[str, Any]], teacher_cfg: ModelConfig | None) -> dict[str, Any]:
    """The strategy as recorded in the version: groups, regularisers, distillation, LoRA, replay, schedule."""
    c = cfg.continual
    out: dict[str, Any] = {
        "groups": table,
        "frozen_params": sum(r["params"] for r in table if r["frozen"]),
        "trainable_params": sum(r["params"] for r in table if not r["frozen"]),
        "schedule": dataclasses.asdict(cfg.schedule), "lr": cfg.optimizer.lr,
        "optimizer_state": "carried" if cfg.optimizer.carry_state else "fresh",
        "replay": {"fraction": cfg.data.replay.fraction, "sources": [s.name for s in cfg.data.replay.sources],
                   "from_lineage": cfg.data.replay.from_lineage},
    }
    if c.l2sp:
        out["l2sp"] = {"lambda": c.l2sp}
    if c.ewc:
        out["ewc"] = {"lambda": c.ewc, "fisher_from": cfg.init.from_version}
    if c.distill.weight:
        out["distill"] = {**dataclasses.asdict(c.distill),
                          "teacher_model": dataclasses.asdict(teacher_cfg) if teacher_cfg else None}
    if c.lora.rank:
        out["lora"] = dataclasses.asdict(c.lora)
    if c.fisher.compute:
        out["fisher"] = dataclasses.asdict(c.fisher)
    kinds = [k for k in ("l2sp", "ewc", "distill", "lora") if k in out]
    if out["frozen_params"] and not c.lora.rank:
        kinds.append("freeze")
    if cfg.data.replay.fraction:
        kinds.append("replay")
    out["kind"] = "+".join(kinds) or ("full" if cfg.init.from_version or cfg.init.from_hf else "pretrain")
    return out
