"""L2-SP: pull the params toward the version the run starts from, (lambda / 2) ||theta - theta*||^2.

    continual.l2sp: 0.1          # lambda; needs a start version (init.from_version or init.from_hf)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
from flax import struct

from lmadapt.continual.fisher import l2sp_penalty
from lmadapt.continual.method import Penalty

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin


@struct.dataclass
class Ref:
    anchor: Any  # theta*: the start version's params


@dataclasses.dataclass(frozen=True)
class L2SP(Penalty):
    lam: float
    name = "l2sp"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> L2SP | None:
        return cls(cfg.continual.l2sp) if cfg.continual.l2sp else None

    def ref_shapes(self, params: Any, rng: jax.Array) -> Ref:
        return Ref(anchor=params)

    def load_ref(self, origin: Origin, params: Any, target: Ref) -> Ref:
        return Ref(anchor=params)

    def penalty(self, theta: Any, ref: Ref) -> jax.Array:
        return l2sp_penalty(theta, ref.anchor, self.lam)

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.lam}
