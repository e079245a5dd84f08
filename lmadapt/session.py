"""A training session: mesh, model, data, optimizer and the jitted step, init and eval functions built
from a config, before any step runs. `build` is also what benchmarks, `eval.py --run` and tests use to
get the exact step the trainer runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmadapt import sharding
from lmadapt.config import Config, ConfigError, TaskConfig
from lmadapt.continual import average
from lmadapt.continual.strategy import SELECTORS, Strategy
from lmadapt.continual.strategy import build as build_strategy
from lmadapt.data import DataError
from lmadapt.data.pipeline import DataPipeline, build_pipeline
from lmadapt.data.tokenizers import Tokenizer, TokenizerError, load_hf_directory_tokenizer
from lmadapt.eval.task_report import TASK_METRICS, load_tasks, score_task
from lmadapt.eval.tasks import Task
from lmadapt.lineage.origin import Origin, resolve_origin
from lmadapt.model import Transformer, per_layer, unstack_layers
from lmadapt.optim import GroupError, ParamGroups, make_optimizer, make_schedule, param_groups, schedule_start
from lmadapt.train_step import Objective, TrainState, eval_step, init_state, start_state, train_step


@dataclasses.dataclass
class Session:
    """Everything built from a config before the first step: mesh, model, data, jitted functions."""

    cfg: Config
    mesh: jax.sharding.Mesh
    model: Transformer
    data: DataPipeline
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the target shardings (for init and restore)
    batch_sharding: jax.sharding.NamedSharding
    local_rows: slice
    init_fn: Callable[..., TrainState]  # (rng[, ref=]): a fresh state (ref: the strategy's constants, if any)
    init_from_fn: Callable[..., TrainState]  # (start params, ref, rng[, opt_state]): start from a version
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_fn: Callable[[Any, dict], tuple[jax.Array, jax.Array]]
    strategy: Strategy
    objective: Objective
    groups: ParamGroups  # which optimizer group each parameter is in (its table is what --dry-run prints)
    tx: optax.GradientTransformation
    tasks: list[tuple[TaskConfig, Task]] = dataclasses.field(default_factory=list)  # eval.tasks, read and checked

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Mesh and logical-axis rules in scope: needed while jitted functions trace and compile."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules_as_tuples(self.cfg.mesh.rules)):
            yield

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The global training batch for `step`, built from this process's rows only."""
        return self._global(self.data.batch(step, self.local_rows))

    def _global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.make_global_batch(local, self.batch_sharding, self.data.batch_size)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out loss per source over its first `eval.batches` batches (the same ones every time), and
        `loss`, the token-weighted mean over all sources."""
        out, total, count = {}, 0.0, 0.0
        for name in self.data.val:
            s_sum = n_sum = 0.0
            for i in range(self.data.val_batches(name, self.cfg.eval.batches)):
                s, n = self.eval_fn(params, self._global(self.data.val_batch(name, i, self.local_rows)))
                s_sum, n_sum = s_sum + float(s), n_sum + float(n)
            out[f"{name}/loss"] = s_sum / max(n_sum, 1.0)
            total, count = total + s_sum, count + n_sum
        out["loss"] = total / max(count, 1.0)
        return {**out, **self.evaluate_tasks(params)} if self.tasks else out

    def evaluate_published(self, params: Any) -> dict[str, float]:
        """`evaluate` of model params (a version's: LoRA merged, averaged) instead of the trainable ones. It
        compiles an eval step of its own: publish calls it once, and only when averaging changed the params."""
        plain = Objective()
        fn = jax.jit(functools.partial(eval_step, model=self.model, objective=plain))
        return dataclasses.replace(self, eval_fn=fn, objective=plain).evaluate(params)

    def evaluate_tasks(self, params: Any) -> dict[str, float]:
        """`eval.tasks` scores of the params being trained: tasks/<name>/<metric> (acc, acc_norm, acc_bytes for
        multiple choice; exact_match, f1 for generation). Scored on the model's own function: LoRA adapters
        merged, stacked layers unstacked into the per-layer layout the scorers compile for."""
        theta = self.objective.effective_params(params)
        if self.cfg.model.scan_layers:
            theta = unstack_layers(theta)
        out = {}
        for cfg, task in self.tasks:
            scores = score_task(theta, per_layer(self.cfg.model), self.data.tokenizer, cfg, task)
            out.update({f"tasks/{task.name}/{k}": float(scores[k]) for k in TASK_METRICS[task.format]})
        return out


def build(cfg: Config, devices: list[jax.Device] | None = None, log: Callable[[str], None] | None = None,
          tokenizer: Tokenizer | None = None, origin: Origin | None = None) -> Session:
    """Construct the session for `cfg` on `devices` (default: all global devices).

    Raises ConfigError for settings that only the devices can check (mesh and batch divisibility) and
    for data problems. `tokenizer` (e.g. the one a run or model version carries) overrides cfg.tokenizer;
    `origin` is where the run starts (its parent's record and artifacts feed the continual strategy).
    The session's `cfg` is `cfg` as the strategy prepared it (e.g. replay sources from the parent's record).
    """
    if devices is None:
        sharding.maybe_initialize_distributed(cfg.distributed)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None
    platforms = sorted({d.platform for d in mesh.devices.flat})
    if cfg.model.attention == "cudnn" and platforms != ["gpu"]:
        raise ConfigError(f"model.attention=cudnn needs NVIDIA GPUs (cuDNN); this run's devices are "
                          f"{', '.join(platforms)}: use model.attention=auto (XLA's attention)")
    rules = cfg.mesh.rules
    shards = sharding.batch_shards(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches} = "
                          f"{micro} rows per microbatch, not divisible by the {shards} batch shards of mesh "
                          f"{dict(mesh.shape)}")
    strategy = build_strategy(cfg, origin)
    cfg = strategy.prepare(cfg)
    model = Transformer(cfg.model)
    levers = cfg.schedule.rewarm_fraction is not None or cfg.schedule.carry
    parent = (origin.lineage.record(origin.parents[0])
              if levers and origin is not None and origin.lineage is not None and origin.parents else None)
    peak_lr, offset = schedule_start(cfg, parent)
    schedule = make_schedule(cfg.schedule, peak_lr, cfg.train.steps, offset)
    try:
        data = build_pipeline(cfg.data, cfg.tokenizer, cfg.train.batch_size, cfg.train.seq_len, tokenizer=tokenizer,
                              log=log if jax.process_index() == 0 else None, steps=cfg.train.steps,
                              keep_replay=bool(cfg.continual.forgetting_budget.sources))
    except (DataError, TokenizerError) as e:
        raise ConfigError(str(e)) from None
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary of "
                          f"{data.vocab_size}")

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_as_tuples(rules)):
        boxed, groups, tx = _abstract_state(cfg, model, strategy, schedule, peak_lr)
    objective = Objective.of(strategy, None if groups.all_trainable else groups.trainable)
    state_shardings = sharding.tree_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.unbox(boxed), state_shardings)
    batch_sh = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    decay = average.ema_decay(strategy)
    init_fn = jax.jit(functools.partial(init_state, model=model, tx=tx, seq_len=cfg.train.seq_len, ema=decay > 0),
                      out_shardings=state_shardings)
    init_from_fn = jax.jit(functools.partial(start_state, strategy=strategy, tx=tx, ema=decay > 0),
                           out_shardings=state_shardings)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                        microbatches=cfg.train.microbatches, objective=objective, ema_decay=decay),
                      in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, objective=objective),
                      in_shardings=(state_shardings.params, batch_sh), out_shardings=replicated)
    return Session(cfg=cfg, mesh=mesh, model=model, data=data,
                   state_shardings=state_shardings, abstract_state=abstract_state, batch_sharding=batch_sh,
                   local_rows=sharding.local_rows(batch_sh, cfg.train.batch_size),
                   init_fn=init_fn, init_from_fn=init_from_fn, step_fn=step_fn, eval_fn=eval_fn,
                   strategy=strategy, objective=objective, groups=groups, tx=tx, tasks=load_tasks(cfg.eval.tasks))


def _abstract_state(cfg: Config, model: Transformer, strategy: Strategy, schedule: optax.Schedule,
                    peak_lr: float | None = None) -> tuple[TrainState, ParamGroups, optax.GradientTransformation]:
    """The whole train state's shapes with logical names (boxed leaves), its param groups and the optimizer
    over them: the model's params, the strategy's layout of them, then the optimizer state, the constants and
    the EMA (float32, with the params' logical names so that it is sharded like them)."""
    rng = jax.random.PRNGKey(0)
    base = jax.eval_shape(functools.partial(init_state, model=model, tx=optax.identity(), seq_len=8, boxed=True),
                          rng)
    params = strategy.param_shapes(base.params, rng)
    try:
        groups = param_groups(params, cfg.optimizer, strategy.frozen, SELECTORS, peak_lr=peak_lr)
    except GroupError as e:
        raise ConfigError(str(e)) from None
    tx = make_optimizer(cfg.optimizer, schedule, groups)
    ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    state = base.replace(params=params, opt_state=jax.eval_shape(tx.init, params),
                         ref=strategy.ref_shapes(base.params, rng), ema=ema if average.ema_decay(strategy) else None)
    return state, groups, tx


def dry_run(cfg: Config) -> str:
    """The parameter-group table and the strategy of `cfg`, as text (builds everything, trains nothing)."""
    origin = resolve_origin(cfg, write=False)
    session = build(origin.cfg, tokenizer=origin.tokenizer, origin=origin)
    desc = session.strategy.describe(session.cfg, list(session.groups.table))
    lines = [f"start: {origin.description}; strategy: {desc['kind']}",
             f"{'group':<16} {'params':>12} {'lr':>10} {'decayed':>12}  frozen"]
    for r in session.groups.table:
        lines.append(f"{r['group']:<16} {r['params']:>12,} {r['lr']:>10.3g} {r['decayed']:>12,}  "
                     f"{'yes' if r['frozen'] else 'no'}")
    lines.append(f"trainable {desc['trainable_params']:,} of {desc['trainable_params'] + desc['frozen_params']:,} "
                 f"parameters")
    return "\n".join(lines)


def run_tokenizer(run_dir: str) -> Tokenizer | None:
    """The tokenizer a run saved (a resumed run keeps it, whatever the cache or sources say now)."""
    return load_hf_directory_tokenizer(run_dir) if os.path.isdir(run_dir) else None
