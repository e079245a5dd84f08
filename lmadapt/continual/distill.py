"""Distillation: learn the data while keeping the teacher's predictions, per real token
data_weight * CE + weight * T^2 * KL(softmax(teacher / T) || softmax(model / T)).

    continual.distill.weight: 0.5      # LwF / self-distillation: the teacher is the parent (the start params)
    continual.distill.teacher: BIG_ID  # or another version, e.g. a bigger model, for a smaller student
    continual.distill.data_weight: 0.5
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from lmadapt.config import ConfigError, ModelConfig
from lmadapt.continual.method import TokenTerm
from lmadapt.data.batch import Batch
from lmadapt.lineage.origin import adopt_architecture, load_version_params
from lmadapt.lineage.store import LineageError
from lmadapt.model import Transformer, forward

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin


@struct.dataclass
class Ref:
    teacher: Any  # the teacher's params (the start params for "parent")


def kl_sums(teacher_logits: jax.Array, logits: jax.Array, temperature: float, loss_mask: jax.Array) -> jax.Array:
    """Sum over real tokens of KL(softmax(teacher / T) || softmax(model / T))."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return jnp.sum(kl * loss_mask.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Distill(TokenTerm):
    weight: float
    temperature: float
    data_weight: float
    teacher: str  # "parent" or a version id
    teacher_model: ModelConfig  # the teacher's architecture (the run's own for "parent")
    name = "distill"
    sums = ("kl",)

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> Distill | None:
        d = cfg.continual.distill
        if not d.weight:
            return None
        return cls(d.weight, d.temperature, d.data_weight, d.teacher, _teacher_model(cfg, origin))

    def ref_shapes(self, params: Any, rng: jax.Array) -> Ref:
        model = Transformer(self.teacher_model)
        return Ref(teacher=jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], rng))

    def load_ref(self, origin: Origin, params: Any, target: Ref) -> Ref:
        if self.teacher == "parent":
            return Ref(teacher=params)
        assert origin.lineage is not None  # _teacher_model checked it
        stored = origin.lineage.model_config(self.teacher).param_dtype
        return Ref(teacher=load_version_params(origin.lineage, self.teacher, target.teacher,
                                               self.teacher_model.scan_layers, stored))

    def term(self, logits: jax.Array, batch: Batch, ref: Ref) -> tuple[jax.Array, dict[str, jax.Array]]:
        teacher_logits = jax.lax.stop_gradient(forward(ref.teacher, Transformer(self.teacher_model), batch))
        kl_sum = kl_sums(teacher_logits, logits, self.temperature, batch["loss_mask"])
        return self.weight * self.temperature**2 * kl_sum, {"kl": kl_sum}

    def describe(self) -> dict[str, Any]:
        return {"weight": self.weight, "temperature": self.temperature, "teacher": self.teacher,
                "data_weight": self.data_weight, "teacher_model": dataclasses.asdict(self.teacher_model)}


def _teacher_model(cfg: Config, origin: Origin | None) -> ModelConfig:
    """The teacher's architecture: the model's own (parent), or another version's with this run's runtime options."""
    d = cfg.continual.distill
    if d.teacher == "parent":
        return cfg.model
    lineage = origin.lineage if origin is not None else None
    if lineage is None:
        raise ConfigError("continual.distill.teacher names a version, so lineage.dir must be set")
    try:
        return adopt_architecture(cfg.model, lineage.model_config(d.teacher))
    except LineageError as e:
        raise ConfigError(f"continual.distill.teacher: {e}") from None
