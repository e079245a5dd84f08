"""EWC: pull each param toward the parent in proportion to its diagonal Fisher, (lambda / 2) sum F (theta - theta*)^2;
and the run that publishes that Fisher for a later EWC run.

    parent run:  continual.fisher.compute: true    # kind: empirical | true, batches, gamma (online EWC)
    update run:  continual.ewc: 1.0                # lambda; init.from_version = the parent

The Fisher is estimated on the finished run's own training mixture (fresh draws after its last step), by
`lmadapt.continual.fisher.fisher_diagonal`; with gamma > 0 the parent's published Fisher is added, decayed by
gamma (online EWC).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
from flax import struct

from lmadapt.config import ConfigError
from lmadapt.continual import fisher
from lmadapt.continual.method import Method, Penalty, Run
from lmadapt.lineage.store import LineageError

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin


@struct.dataclass
class Ref:
    anchor: Any  # theta*: the parent version's params
    fisher: Any  # F: the parent's published diagonal Fisher (float32, the params' shapes)


@dataclasses.dataclass(frozen=True)
class EWC(Penalty):
    lam: float
    fisher_from: str | None  # the parent version whose Fisher is read
    name = "ewc"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> EWC | None:
        return cls(cfg.continual.ewc, cfg.init.from_version) if cfg.continual.ewc else None

    def ref_shapes(self, params: Any, rng: jax.Array) -> Ref:
        return Ref(anchor=params, fisher=params)

    def load_ref(self, origin: Origin, params: Any, target: Ref) -> Ref:
        assert origin.lineage is not None and origin.parents  # validated: ewc needs init.from_version
        try:
            estimate = origin.lineage.load_artifact(origin.parents[0], "fisher", target.fisher)
        except LineageError as e:
            raise ConfigError(f"continual.ewc: {e}; publish the parent with continual.fisher.compute=true") from None
        return Ref(anchor=params, fisher=estimate)

    def penalty(self, theta: Any, ref: Ref) -> jax.Array:
        return fisher.ewc_penalty(theta, ref.anchor, ref.fisher, self.lam)

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.lam, "fisher_from": self.fisher_from}


@dataclasses.dataclass(frozen=True)
class PublishFisher(Method):
    """Publish the new version's diagonal Fisher as its "fisher" artifact (for a later EWC run)."""

    kind_of: str  # "empirical" | "true"
    batches: int
    gamma: float
    after_step: int  # the run's last step: the Fisher's batches are the mixture's next ones
    seed: int
    name = "fisher"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> PublishFisher | None:
        f = cfg.continual.fisher
        return cls(f.kind, f.batches, f.gamma, cfg.train.steps, cfg.run.seed + 1) if f.compute else None

    def kind(self) -> str | None:
        return None  # publishing a Fisher does not change how this run trains

    def describe(self) -> dict[str, Any]:
        return {"compute": True, "kind": self.kind_of, "batches": self.batches, "gamma": self.gamma}

    def artifacts(self, params: Any, run: Run, origin: Origin) -> dict[str, Any]:
        batches = (run.batch(self.after_step + i) for i in range(self.batches))  # fresh draws of the same mixture
        estimate = fisher.fisher_diagonal(params, run.model, batches, kind=self.kind_of,
                                          rng=jax.random.PRNGKey(self.seed))
        parent = origin.parents[0] if origin.lineage is not None and origin.parents else None
        if parent is not None and self.gamma > 0 and "fisher" in origin.lineage.record(parent).get("artifacts", []):
            estimate = fisher.accumulate_online(origin.lineage.load_artifact(parent, "fisher"), estimate, self.gamma)
        return {"fisher": estimate}
