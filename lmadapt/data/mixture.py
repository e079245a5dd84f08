"""The mixture's arithmetic: which source each slot of the batch stream goes to, in closed form, and the
phases of a mixture that changes at given steps (each phase a constant mixture, counted from its first step).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def assign_slots(slots: np.ndarray, weights: list[float], offsets: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(component, draw index within the component) of global slots, in closed form.

    Component k takes slot g of the stream left over by components < k when
    floor((g + 1) p + u) > floor(g p + u), with p its weight relative to what is left; floor(g p + u)
    counts its earlier slots. Every window of n consecutive slots holds floor or ceil of n * p of them.
    """
    comp = np.full(len(slots), len(weights) - 1, np.int64)
    index = slots.astype(np.int64).copy()
    rest = slots.astype(np.int64)
    left = 1.0
    active = np.ones(len(slots), bool)
    for k, (w, u) in enumerate(zip(weights[:-1], offsets[:-1], strict=True)):
        p = min(w / left, 1.0)
        before = np.floor(rest * p + u).astype(np.int64)
        mine = active & (np.floor((rest + 1) * p + u).astype(np.int64) > before)
        comp[mine], index[mine] = k, before[mine]
        active &= ~mine
        rest = rest - before
        index[active] = rest[active]
        left -= w
    return comp, index


Phase = tuple[int, float]  # (first step, replay fraction)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One phase's constant mixture: the components it draws from (weight > 0) and every component's draws
    before the phase's first slot."""

    start: int
    fraction: float
    active: np.ndarray  # component indices with a positive weight in this phase
    weights: list[float]  # of the active components
    offsets: list[float]
    base: np.ndarray  # int64 [components]: draws in all earlier phases

    def draws(self, n_slots: int, n_components: int) -> np.ndarray:
        """Each component's draws in the first `n_slots` slots of this phase (closed form)."""
        out = np.zeros(n_components, np.int64)
        for j, k in enumerate(self.active.tolist()):
            out[k] = draws_before(n_slots, j, self.weights, self.offsets)
        return out


def mixture_weight(fraction: float, replay: bool, has_replay: bool, weight: float, group_total: float) -> float:
    """A source's share of the batch: its group's (replay: `fraction`, else the rest) times its weight in it."""
    share = fraction if replay else 1.0 - (fraction if has_replay else 0.0)
    return share * weight / group_total


def draws_before(n: int, k: int, weights: list[float], offsets: list[float]) -> int:
    """How many of the first `n` slots component `k` takes (the draw index `assign_slots` gives slot n)."""
    rest, left = n, 1.0
    for j, (w, u) in enumerate(zip(weights, offsets, strict=True)):
        if j == len(weights) - 1:
            return rest
        p = min(w / left, 1.0)
        before = int(np.floor(rest * p + u))
        if j == k:
            return before
        rest -= before
        left -= w
    return rest


def replay_schedule(fraction: float, final: float | None, n: int, steps: int | None) -> list[Phase]:
    """The mixture's phases for data.replay: `fraction` throughout, or (with `final`) n equal phases of the
    run's `steps`, phase k of n starting at step k * steps // n with fraction + (final - fraction) * k / (n - 1)."""
    if final is None or steps is None or n < 2:
        return [(0, fraction)]
    starts: dict[int, float] = {}
    for k in range(n):  # a run shorter than n steps: a later phase replaces one starting at the same step
        starts[k * steps // n] = fraction + (final - fraction) * k / (n - 1)
    return sorted(starts.items())
