"""A forgetting budget: the replay fraction moved while training, so that the held-out loss on earlier
versions' data rises at most `max_rise` nats over the parent's.

    continual.forgetting_budget: {sources: [shakespeare], max_rise: 0.02, replay_step: 0.1, max_fraction: 0.6}

The parent's losses (the run's start params, evaluated at step 0) are the baseline; at every eval point
`decide` (a pure rule) gives the next fraction from each source's rise, and a changed fraction starts a new
phase of the data mixture at the next step. `Budget` holds the baseline and the decisions; they and the
mixture's phases travel in each checkpoint's meta, so a resumed run sees the batches, and makes the
decisions, of an uninterrupted one (a decision after the last checkpoint is recomputed from the same params).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lmadapt.config import BudgetConfig, Config, ConfigError


def decide(fraction: float, rises: dict[str, float], cfg: BudgetConfig, floor: float) -> float:
    """The replay fraction after an eval point: up `replay_step` (at most `max_fraction`) when any source rose
    more than `max_rise` (a non-finite loss counts as over), down `replay_step` (not below `floor`) when every
    source is under `slack * max_rise`, else unchanged. Rounded to 1e-9 so repeated steps stay readable."""
    if any(not rise <= cfg.max_rise for rise in rises.values()):
        new = min(fraction + cfg.replay_step, cfg.max_fraction)
    elif all(rise < cfg.slack * cfg.max_rise for rise in rises.values()):
        new = max(fraction - cfg.replay_step, floor)
    else:
        new = fraction
    return round(new, 9)


@dataclasses.dataclass
class Budget:
    """A run's forgetting budget: its settings, the baseline losses and every decision so far."""

    cfg: BudgetConfig
    floor: float  # data.replay.fraction: the budget never replays less than the config asks
    baseline: dict[str, float] | None = None
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, cfg: Config, saved: dict[str, Any] | None, step: int | None) -> tuple[Budget | None, list | None]:
        """(the run's budget, the mixture phases to resume with) from checkpoint `step`'s meta `saved` (None:
        a fresh run, whose baseline is measured at step 0); (None, None) without budget sources."""
        b = cfg.continual.forgetting_budget
        if not b.sources:
            return None, None
        budget = cls(b, cfg.data.replay.fraction)
        if saved is None:
            return budget, None
        state = saved.get("budget")
        if not isinstance(state, dict) or not isinstance(state.get("baseline"), dict):
            raise ConfigError(f"checkpoint {step} was saved without a forgetting budget, so the parent's losses it "
                              f"is measured against are unknown: remove continual.forgetting_budget or start a new "
                              f"run.dir")
        budget.baseline = {k: float(v) for k, v in state["baseline"].items()}
        budget.decisions = [d for d in state.get("decisions", []) if d["step"] <= step]
        return budget, [(int(s), float(f)) for s, f in state["phases"]]

    def rises(self, evals: dict[str, float]) -> dict[str, float]:
        """Held-out loss minus the baseline, per budget source (`evals`: Session.evaluate's)."""
        assert self.baseline is not None
        return {name: evals[f"{name}/loss"] - self.baseline[name] for name in self.cfg.sources}

    def start(self, evals: dict[str, float]) -> None:
        """Take the baseline from the start params' evaluation."""
        self.baseline = {name: evals[f"{name}/loss"] for name in self.cfg.sources}

    def observe(self, step: int, evals: dict[str, float], fraction: float) -> dict[str, Any]:
        """Decide at eval point `step` from the mixture's current `fraction`; the decision is kept and returned."""
        rises = self.rises(evals)
        new = decide(fraction, rises, self.cfg, self.floor)
        change = "up" if new > fraction else "down" if new < fraction else "none"
        decision = {"step": int(step), "from": fraction, "to": new, "change": change, "rises": rises}
        self.decisions.append(decision)
        return decision

    def state(self, phases: list[tuple[int, float]]) -> dict[str, Any]:
        """What a checkpoint keeps (JSON, fresh objects: a save in flight never sees a later decision)."""
        return {"baseline": None if self.baseline is None else dict(self.baseline),
                "phases": [[int(s), float(f)] for s, f in phases],
                "decisions": [{**d, "rises": dict(d["rises"])} for d in self.decisions]}

    def metrics(self, decision: dict[str, Any]) -> dict[str, float]:
        """The decision as scalars (logged under `budget/`)."""
        rises = decision["rises"]
        return {"replay_fraction": decision["to"], "max_rise": self.cfg.max_rise,
                "worst_rise": max(rises.values()), **{f"{k}/rise": v for k, v in rises.items()}}

    def message(self, decision: dict[str, Any]) -> str:
        """One line for a changed fraction: the worst source, its rise against the budget, old and new fraction."""
        worst = max(decision["rises"], key=lambda k: decision["rises"][k])
        return (f"forgetting budget at step {decision['step']}: {worst} loss rose {decision['rises'][worst]:+.4f} "
                f"(budget {self.cfg.max_rise:g}); replay fraction {decision['from']:.3f} -> {decision['to']:.3f}")

    def describe(self, evals: dict[str, float], phases: list[tuple[int, float]]) -> dict[str, Any]:
        """The version record's entry: settings, baseline, final losses and rises, phases and decisions, and
        whether the budget held at the end (`exceeded`: the sources over it)."""
        rises = self.rises(evals)
        exceeded = [k for k, v in rises.items() if not (math.isfinite(v) and v <= self.cfg.max_rise)]
        return {**dataclasses.asdict(self.cfg), "sources": list(self.cfg.sources), "floor": self.floor,
                "baseline": self.baseline, "final": {k: evals[f"{k}/loss"] for k in self.cfg.sources}, "rises": rises,
                "phases": [[s, f] for s, f in phases], "decisions": self.decisions,
                "held": not exceeded, "exceeded": exceeded, "why": self._why(exceeded, phases)}

    def _why(self, exceeded: list[str], phases: list[tuple[int, float]]) -> str | None:
        """Why the budget did not hold, in words a reader of the record can act on (None when it held)."""
        if not exceeded:
            return None
        start, fraction = phases[-1]
        if fraction >= self.cfg.max_fraction:
            return (f"replay was at continual.forgetting_budget.max_fraction={self.cfg.max_fraction:g} from step "
                    f"{start} on and {', '.join(exceeded)} still rose more than {self.cfg.max_rise:g}: raise "
                    f"max_fraction, or add distillation or a smaller learning rate")
        return (f"the last eval point raised replay to {fraction:g} (step {start}) but the run ended before it took "
                f"effect: evaluate more often (eval.every) or use a larger replay_step")
