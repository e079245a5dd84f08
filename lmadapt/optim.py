"""Optimizer and learning-rate schedule construction: the one place an optax transform is built."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lmadapt.config import OptimizerConfig, ScheduleConfig


def make_schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step: linear warmup, then cosine decay or constant."""
    if cfg.kind == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(peak_lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, cfg.warmup_steps), optax.constant_schedule(peak_lr)],
            [cfg.warmup_steps])
    decay_steps = cfg.decay_steps or total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        end_value=peak_lr * cfg.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, decoupled weight decay on matrices, and the schedule."""
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
