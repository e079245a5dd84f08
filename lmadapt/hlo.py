"""What a compiled step communicates: the collectives in its optimized HLO, counted and sized.

Used by `tools/bench_collectives.py` and by the sharding tests to check that a training step reduces each
gradient once (one all-reduce or reduce-scatter worth of bytes per gradient), not more.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

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
