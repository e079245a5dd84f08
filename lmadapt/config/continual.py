"""The continual-learning sections of the config: how an update stays close to what its parent knew.

`continual.recipe` names a preset (lmadapt.config.recipes): a set of these keys, and of schedule and
replay keys, that a run gets with one key; keys the config or command line sets win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmadapt.config.base import _Frozen


@dataclass(frozen=True)
class FisherConfig(_Frozen):
    """Estimate the diagonal Fisher of the run's result on its training data and publish it with the
    version (EWC in a later stage reads it). Online EWC: the parent's Fisher times `gamma` is added."""

    compute: bool = False
    kind: Literal["empirical", "true"] = "empirical"
    batches: int = 8
    gamma: float = 1.0


@dataclass(frozen=True)
class DistillConfig(_Frozen):
    """Distillation: loss = data_weight * CE + weight * T^2 * KL(teacher_T || student_T) on the run's data.
    teacher "parent" (LwF / self-distillation) or a version id (e.g. a bigger model, for a smaller student)."""

    weight: float = 0.0
    temperature: float = 2.0
    teacher: str = "parent"
    data_weight: float = 1.0


@dataclass(frozen=True)
class LoraConfig(_Frozen):
    """Low-rank adapters on `targets` (q, k, v, o, gate, up, down); the base is frozen. rank 0: off."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")


@dataclass(frozen=True)
class AverageConfig(_Frozen):
    """Weight averaging along the chain. `wise`: WiSE-FT, the published params are (1 - wise) * parent +
    wise * trained (1: the trained params exactly, 0: the parent's). `ema`: the published params are an
    exponential moving average of the trained ones with this decay (0: off), kept in the train state."""

    wise: float | None = None
    ema: float = 0.0


@dataclass(frozen=True)
class BudgetConfig(_Frozen):
    """A forgetting budget: at every eval point the held-out loss of `sources` (earlier versions' data, by
    name) may rise at most `max_rise` nats over the parent's (measured at step 0). Over budget, the replay
    fraction goes up by `replay_step` (at most `max_fraction`); with every source below `slack * max_rise`
    it goes down by `replay_step` (not below data.replay.fraction). Needs eval.every > 0 and replay sources."""

    sources: tuple[str, ...] = ()  # empty: no budget
    max_rise: float = 0.02
    replay_step: float = 0.1
    max_fraction: float = 0.6
    slack: float = 0.5


@dataclass(frozen=True)
class ContinualConfig(_Frozen):
    """Regularised updates toward the parent version theta*: L2-SP and EWC weights (lambda), distillation,
    LoRA, the Fisher estimate this run publishes, weight averaging, a forgetting budget, and a named recipe."""

    recipe: str | None = None  # a preset from lmadapt.config.recipes (e.g. replay-rewarm)
    l2sp: float = 0.0
    ewc: float = 0.0
    fisher: FisherConfig = field(default_factory=FisherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    forgetting_budget: BudgetConfig = field(default_factory=BudgetConfig)
