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
import numpy as np
import optax

from lmadapt import sharding
from lmadapt.config import Config, ConfigError, ModelConfig
from lmadapt.continual import strategy
from lmadapt.data import DataError
from lmadapt.data.pipeline import DataPipeline, build_pipeline
from lmadapt.data.tokenizers import Tokenizer, TokenizerError, load_hf_directory_tokenizer
from lmadapt.lineage.origin import resolve_origin
from lmadapt.model import Transformer
from lmadapt.optim import GroupError, group_labels, group_table, make_optimizer, make_schedule, param_paths
from lmadapt.train_step import Objective, TrainState, eval_step, init_state, train_step


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
    init_fn: Callable[[jax.Array], TrainState]
    init_from_fn: Callable[..., TrainState]  # (base params, ref, rng[, opt_state]): start from a version
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_fn: Callable[[Any, dict], tuple[jax.Array, jax.Array]]
    objective: Objective
    groups: list[dict[str, Any]]  # the parameter-group table (what --dry-run prints)
    tx: optax.GradientTransformation
    leaf_groups: list[tuple[str, str]]  # (path, group) of every params leaf, in tree order

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
        return out


def build(cfg: Config, devices: list[jax.Device] | None = None, log: Callable[[str], None] | None = None,
          tokenizer: Tokenizer | None = None, teacher_cfg: ModelConfig | None = None) -> Session:
    """Construct the session for `cfg` on `devices` (default: all global devices).

    Raises ConfigError for settings that only the devices can check (mesh and batch divisibility) and
    for data problems. `tokenizer` (e.g. the one a run or model version carries) overrides cfg.tokenizer.
    """
    if devices is None:
        sharding.maybe_initialize_distributed(cfg.distributed)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None
    rules = cfg.mesh.rules
    shards = sharding.batch_shards(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches} = "
                          f"{micro} rows per microbatch, not divisible by the {shards} batch shards of mesh "
                          f"{dict(mesh.shape)}")

    model = Transformer(cfg.model)
    teacher = Transformer(teacher_cfg) if cfg.continual.distill.weight and teacher_cfg else None
    if cfg.continual.distill.weight and teacher is None:
        teacher = model  # LwF: the parent shares the architecture
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule, strategy.frozen_extra(cfg))
    try:
        data = build_pipeline(cfg.data, cfg.tokenizer, cfg.train.batch_size, cfg.train.seq_len, tokenizer=tokenizer,
                              log=log if jax.process_index() == 0 else None)
    except (DataError, TokenizerError) as e:
        raise ConfigError(str(e)) from None
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary of "
                          f"{data.vocab_size}")

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_as_tuples(rules)):
        try:
            boxed = strategy.abstract_state(cfg, model, tx, teacher)
            objective = strategy.make_objective(cfg, boxed.params, teacher)
        except GroupError as e:
            raise ConfigError(str(e)) from None
    state_shardings = sharding.tree_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.unbox(boxed), state_shardings)
    batch_sh = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    init_fn = jax.jit(functools.partial(init_state, model=model, tx=tx, seq_len=cfg.train.seq_len),
                      out_shardings=state_shardings)
    init_from_fn = jax.jit(functools.partial(strategy.start_state, cfg=cfg, tx=tx), out_shardings=state_shardings)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                        microbatches=cfg.train.microbatches, objective=objective),
                      in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, objective=objective),
                      in_shardings=(state_shardings.params, batch_sh), out_shardings=replicated)
    labels = group_labels(boxed.params, cfg.optimizer.groups, strategy.frozen_extra(cfg))
    table = group_table(nn.unbox(boxed.params), labels, cfg.optimizer, cfg.optimizer.lr)
    return Session(cfg=cfg, mesh=mesh, model=model, data=data,
                   state_shardings=state_shardings, abstract_state=abstract_state, batch_sharding=batch_sh,
                   local_rows=sharding.local_rows(batch_sh, cfg.train.batch_size),
                   init_fn=init_fn, init_from_fn=init_from_fn, step_fn=step_fn, eval_fn=eval_fn,
                   objective=objective, groups=table, tx=tx,
                   leaf_groups=list(zip(jax.tree.leaves(param_paths(boxed.params)), jax.tree.leaves(labels),
                                        strict=True)))


def dry_run(cfg: Config) -> str:
    """The parameter-group table and the strategy of `cfg`, as text (builds everything, trains nothing)."""
    origin = resolve_origin(cfg, write=False)
    session = build(origin.cfg, tokenizer=origin.tokenizer, teacher_cfg=origin.teacher_cfg)
    desc = strategy.describe(origin.cfg, session.groups, origin.teacher_cfg)
    lines = [f"start: {origin.description}; strategy: {desc['kind']}",
             f"{'group':<16} {'params':>12} {'lr':>10} {'decayed':>12}  frozen"]
    for r in session.groups:
        lines.append(f"{r['group']:<16} {r['params']:>12,} {r['lr']:>10.3g} {r['decayed']:>12,}  "
                     f"{'yes' if r['frozen'] else 'no'}")
    lines.append(f"trainable {desc['trainable_params']:,} of {desc['trainable_params'] + desc['frozen_params']:,} "
                 f"parameters")
    return "\n".join(lines)


def run_tokenizer(run_dir: str) -> Tokenizer | None:
    """The tokenizer a run saved (a resumed run keeps it, whatever the cache or sources say now)."""
    return load_hf_directory_tokenizer(run_dir) if os.path.isdir(run_dir) else None
