"""What a compiled step communicates: the collectives in its optimized HLO, counted and sized.

Used by `tools/bench_collectives.py` and by `tests/test_hlo.py`, which checks that a training step reduces
each gradient once (one all-reduce or reduce-scatter worth of bytes per gradient), not more.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:  # annotations only: counting collectives in HLO text needs none of the training stack
    from lmadapt.session import Session

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute", "all-to-all")
# "%name = f32[8,16]{1,0} all-reduce(...)" or a tuple result "(f32[8], f32[4,4]) all-reduce(...)";
# async pairs ("all-gather-start"/"-done") are counted once, at the start.
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


@dataclass
class Collectives:
    """Per kind: how many ops and how many bytes their results hold (per device)."""

    count: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def table(self) -> str:
        """A text table: one row per kind that occurs, with its op count and MiB per device."""
        lines = [f"{'collective':<20} {'ops':>5} {'MiB/device':>11}"]
        for kind in COLLECTIVES:
            if self.count[kind]:
                lines.append(f"{kind:<20} {self.count[kind]:>5} {self.bytes[kind] / 2**20:>11.3f}")
        return "\n".join(lines)


def _result_bytes(result: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(result):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _BYTES.get(dtype, 4)
    return total


def count_collectives(hlo_text: str) -> Collectives:
    """Collectives in an HLO module's text (`compiled.as_text()`)."""
    out = Collectives()
    for result, kind, _ in _OP.findall(hlo_text):
        out.count[kind] += 1
        out.bytes[kind] += _result_bytes(result)
    return out


@dataclass
class StepCommunication:
    """A compiled train step's collectives, its optimized HLO, and the gradient bytes they should match:
    all of them (`grad_bytes`) and one device's shards (`grad_bytes_per_device`)."""

    collectives: Collectives
    hlo: str
    grad_bytes: float
    grad_bytes_per_device: float

    @property
    def reduced_bytes(self) -> float:
        return float(self.collectives.bytes["all-reduce"] + self.collectives.bytes["reduce-scatter"])


def step_communication(session: Session) -> StepCommunication:
    """Compile `session`'s train step for its mesh and count what it sends."""
    with session.activate():
        compiled = session.step_fn.lower(session.abstract_state, session.batch(0)).compile()
    full = shard = 0.0
    for leaf in jax.tree.leaves(session.abstract_state.params):
        full += float(np.prod(leaf.shape)) * leaf.dtype.itemsize
        shard += float(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    text = compiled.as_text()
    return StepCommunication(count_collectives(text), text, full, shard)
