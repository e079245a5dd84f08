"""Optimizer and learning-rate schedule construction: the one place an optax transform is built.

Parameter groups are data (`optimizer.groups`): selectors map every parameter path to a group label,
and the optimizer is an `optax.multi_transform` over those labels. Frozen groups get
`optax.set_to_zero()` (no optimizer state at all); the others AdamW with their own learning-rate scale
and weight-decay mask.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from lmadapt.config import Config, ConfigError, GroupConfig, OptimizerConfig, ScheduleConfig

DEFAULT_GROUP = "default"
_LAYER_RE = re.compile(r"(?:^|/)layers_(\d+)(?:/|$)")
# Named selectors: what a reader of the model would call these parts (paths as in lmadapt.model). Continual
# methods bring their own (LoRA: "lora", "base"), passed in as `selectors`.
NAMED: Mapping[str, Callable[[str], bool]] = {
    "embeddings": lambda p: re.search(r"(^|/)(pos_)?embed/", p) is not None,
    "attention": lambda p: "/attn/" in p or p.startswith("attn/"),
    "mlp": lambda p: "/mlp/" in p or p.startswith("mlp/"),
    "norms": lambda p: re.search(r"(^|/)\w*norm/", p) is not None,
    "head": lambda p: re.search(r"(^|/)lm_head/", p) is not None,
    "biases": lambda p: p.endswith("/bias"),
}


class GroupError(ValueError):
    """A group selector is malformed; the message names the group and the selector."""


def param_paths(params: Any) -> Any:
    """A tree like `params` whose leaves are their "/"-joined paths (e.g. layers_0/attn/q/kernel).
    Boxed `nn.Partitioned` leaves count as leaves, so the same labels fit boxed and plain trees."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _matches(selector: str, path: str, group: str, named: Mapping[str, Callable[[str], bool]]) -> bool:
    for part in selector.split("+"):
        part = part.strip()
        if part.startswith("layers:"):
            try:
                lo, _, hi = part[len("layers:"):].partition("-")
                lo_i, hi_i = int(lo), int(hi or lo)
            except ValueError:
                raise GroupError(f"optimizer.groups {group!r}: selector {part!r}: expected layers:A-B") from None
            m = _LAYER_RE.search(path)
            if "layers/" in path and m is None:
                raise GroupError(f"optimizer.groups {group!r}: selector {part!r} needs per-layer params "
                                 f"(set model.scan_layers=false)")
            if m is None or not lo_i <= int(m.group(1)) <= hi_i:
                return False
        elif part.startswith("re:"):
            if re.search(part[3:], path) is None:
                return False
        elif part in named:
            if not named[part](path):
                return False
        else:
            raise GroupError(f"optimizer.groups {group!r}: unknown selector {part!r} (use {', '.join(named)}, "
                             f"layers:A-B or re:REGEX)")
    return True


def _decays(group: GroupConfig | None, leaf: Any) -> bool:
    """Weight decay on matrices only (norms, biases and other vectors are not decayed), unless the group says."""
    if group is not None and group.weight_decay is not None:
        return bool(group.weight_decay)
    return getattr(leaf, "ndim", 0) >= 2


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which optimizer group every parameter is in, computed once from the trainable params' shapes.

    `labels` and `trainable` are trees of the params' structure (one group name / bool per leaf); `names` the
    groups the optimizer has a transform for (none when it needs no groups); `table` one row per group (what
    `--dry-run` prints and the version record keeps); `leaf_groups` (path, group) per leaf in tree order.
    """

    labels: Any
    trainable: Any
    names: tuple[str, ...]
    table: tuple[dict[str, Any], ...]
    leaf_groups: tuple[tuple[str, str], ...]

    @property
    def all_trainable(self) -> bool:
        return all(jax.tree.leaves(self.trainable))


def param_groups(params: Any, cfg: OptimizerConfig, frozen: Sequence[str] = (),
                 selectors: Mapping[str, Callable[[str], bool]] | None = None, peak_lr: float | None = None
                 ) -> ParamGroups:
    """The groups of `params` (boxed or plain shapes): each leaf goes to the first group with a matching
    selector, else "default"; leaves matching a named selector in `frozen` (e.g. "base" under LoRA) go to the
    frozen group "frozen_<selector>" first. `selectors`: named selectors beyond `NAMED`. `peak_lr`: the run's
    peak learning rate for the table (`schedule_start`; None: optimizer.lr)."""
    named = {**NAMED, **(selectors or {})}
    by_name = {g.name: g for g in cfg.groups}

    def label(path: str) -> str:
        for sel in frozen:
            if _matches(sel, path, sel, named):
                return f"frozen_{sel}"
        for g in cfg.groups:
            if any(_matches(sel, path, g.name, named) for sel in g.select):
                return g.name
        return DEFAULT_GROUP

    paths = param_paths(params)
    labels = jax.tree.map(label, paths)
    frozen_groups = {g.name for g in cfg.groups if g.frozen}
    trainable = jax.tree.map(lambda lab: not (lab in frozen_groups or lab.startswith("frozen_")), labels)
    names = (DEFAULT_GROUP, *by_name, *(f"frozen_{sel}" for sel in frozen)) if cfg.groups or frozen else ()
    flat_labels = jax.tree.leaves(labels)
    return ParamGroups(labels=labels, trainable=trainable, names=names,
                       table=_table(_leaves(params), flat_labels, cfg, peak_lr),
                       leaf_groups=tuple(zip(jax.tree.leaves(paths), flat_labels, strict=True)))


def _leaves(params: Any) -> list[Any]:
    # The values of boxed leaves without nn.unbox, which would apply sharding constraints under a mesh.
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return [x.value if isinstance(x, nn.Partitioned) else x for x in leaves]


def _table(leaves: list[Any], labels: list[str], cfg: OptimizerConfig, peak_lr: float | None = None
           ) -> tuple[dict[str, Any], ...]:
    """One row per group: parameter count, peak learning rate, weight decay, frozen (for `--dry-run`)."""
    peak = cfg.lr if peak_lr is None else peak_lr
    groups = {g.name: g for g in cfg.groups}
    rows: dict[str, dict[str, Any]] = {}
    for lab, p in zip(labels, leaves, strict=True):
        g = groups.get(lab)
        frozen = lab.startswith("frozen_") or bool(g and g.frozen)
        row = rows.setdefault(lab, {"group": lab, "params": 0, "tensors": 0, "frozen": frozen,
                                    "lr": 0.0 if frozen else peak * (g.lr_scale if g else 1.0),
                                    "decayed": 0})
        n = math.prod(p.shape)
        row["params"] += n
        row["tensors"] += 1
        row["decayed"] += n if (_decays(g, p) and not frozen and cfg.weight_decay > 0) else 0
    return tuple(sorted(rows.values(), key=lambda r: r["group"]))


def make_schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int, offset: int = 0) -> optax.Schedule:
    """Learning rate as a function of the step: linear warmup, then cosine decay, constant, or wsd.

    `offset`: the schedule position carried from the parent (`schedule.carry`); step t of this run is position
    offset + t. Warmup then only covers positions still inside `warmup_steps`. Cosine decays over
    `decay_steps`, or to this run's last step when null; wsd's stable part and cooldown are this run's own.
    """
    if cfg.kind == "wsd":
        return _wsd(cfg, peak_lr, total_steps, offset)
    if cfg.kind == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(peak_lr)
        base = optax.join_schedules([optax.linear_schedule(0.0, peak_lr, cfg.warmup_steps),
                                     optax.constant_schedule(peak_lr)], [cfg.warmup_steps])
    else:
        decay_steps = cfg.decay_steps or offset + total_steps
        base = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak_lr, warmup_steps=cfg.warmup_steps,
            decay_steps=max(decay_steps, cfg.warmup_steps + 1), end_value=peak_lr * cfg.min_lr_ratio)
    # One schedule over the lineage's positions, read from this run's first one on.
    return base if offset == 0 else (lambda step: base(step + offset))


def _wsd(cfg: ScheduleConfig, peak_lr: float, total_steps: int, offset: int) -> optax.Schedule:
    """Warmup (at the carried position), stable, then a linear cooldown over the last `decay_fraction` of
    this run's steps: a carried child past warmup starts at the peak and still cools down at its own end."""
    warmup = optax.linear_schedule(0.0, peak_lr, cfg.warmup_steps)
    decay_steps = cfg.decay_steps or total_steps
    n_decay = max(1, round(decay_steps * cfg.decay_fraction))
    warmup_left = max(cfg.warmup_steps - offset, 0)
    stable = max(decay_steps - n_decay - warmup_left, 0)
    first = warmup if offset == 0 else (lambda step: warmup(step + offset))
    return optax.join_schedules(
        [first, optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, peak_lr * cfg.min_lr_ratio, n_decay)],
        [warmup_left, warmup_left + stable])


def parent_schedule(record: Mapping[str, Any]) -> tuple[float, int]:
    """(peak learning rate, end position) of a version's schedule, from its record: the "schedule" entry of its
    strategy, or for versions published before that entry, its config's optimizer.lr and its steps."""
    entry = (record.get("strategy") or {}).get("schedule") or {}
    end = entry.get("end", record["steps"])
    peak = entry.get("peak_lr", ((record.get("config") or {}).get("optimizer") or {}).get("lr"))
    return peak, int(end)


def schedule_start(cfg: Config, parent_record: Mapping[str, Any] | None) -> tuple[float, int]:
    """(peak learning rate, schedule offset) of a run whose parent's version record is `parent_record` (None: a
    run without a parent). Without `schedule.rewarm_fraction` and `schedule.carry`: (optimizer.lr, 0)."""
    s = cfg.schedule
    if s.rewarm_fraction is None and not s.carry:
        return cfg.optimizer.lr, 0
    key = "schedule.rewarm_fraction" if s.rewarm_fraction is not None else "schedule.carry"
    if parent_record is None:
        raise ConfigError(f"{key}: the run has no parent version to take the schedule from (set init.from_version)")
    peak, end = parent_schedule(parent_record)
    if s.rewarm_fraction is None:
        return cfg.optimizer.lr, end
    if not isinstance(peak, int | float) or peak <= 0:
        raise ConfigError(f"schedule.rewarm_fraction: version {parent_record.get('id')!r} records no peak learning "
                          f"rate (strategy.schedule.peak_lr or config.optimizer.lr); set optimizer.lr instead")
    return s.rewarm_fraction * float(peak), end if s.carry else 0


def schedule_entry(cfg: Config, parent_record: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the version record keeps of this run's schedule for its children: peak, start and end position."""
    peak, start = schedule_start(cfg, parent_record)
    return {"peak_lr": peak, "start": start, "end": start + cfg.train.steps}


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed."""
    return jax.tree.map(lambda p: _decays(None, p), params)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule, groups: ParamGroups | None = None
                   ) -> optax.GradientTransformation:
    """Global-norm clipping, then per-group AdamW (or nothing, for frozen groups), over `groups.labels`.

    Without groups (none configured, none frozen by a method) one AdamW for all parameters.
    """
    by_name = {g.name: g for g in cfg.groups}

    def adamw(group: GroupConfig | None) -> optax.GradientTransformation:
        scale = group.lr_scale if group else 1.0
        lr = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
        decay = group.weight_decay if group else None
        mask = decay_mask if decay is None else (lambda p: jax.tree.map(lambda _: decay, p))
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)

    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if groups is None or not groups.names:
        if cfg.groups:
            raise ValueError("make_optimizer: optimizer.groups are configured; pass their ParamGroups")
        parts.append(adamw(None))
        return optax.chain(*parts)
    transforms = {n: optax.set_to_zero() if n.startswith("frozen_") or (n in by_name and by_name[n].frozen)
                  else adamw(by_name.get(n)) for n in groups.names}
    labels = groups.labels
    # The labels were computed once; the callable only hands them over (boxed params share their structure).
    parts.append(optax.multi_transform(transforms, lambda _: labels))
    return optax.chain(*parts)
