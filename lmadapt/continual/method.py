"""What a continual method is: one object, built once from the config, that owns everything the method needs.

A method is a frozen dataclass of its settings (`from_config` returns None when the run does not use it). The
run's `Strategy` (strategy.py) is the tuple of the methods in use; the train step sees them only through the
roles below, so adding a method is one new module plus one line in `strategy.METHODS`.

Every method may
  - rewrite the run's config from the version it starts from (`prepare`: replay of the parent's sources),
  - describe itself in the version record (`describe`, under its `name`) and name its `kind`,
  - publish artifacts with the version (`artifacts`: the Fisher a later EWC run reads),
  - name params selectors for `optimizer.groups` (`SELECTORS`) and freeze some of them (`frozen`).
A method that keeps constants in the train state is a `WithRef`: its reference tensors are the named fields
of its own `Ref` dataclass, stored under `TrainState.ref[name]`, shaped by `ref_shapes` and loaded from the
parent version by `load_ref`. What it adds to the objective is its role:
  - `Penalty`: a function of the model's params and its ref, added once per step (L2-SP, EWC);
  - `TokenTerm`: a sum over real tokens of a function of the logits, its ref and the batch (distillation);
  - `Layout`: the trainable params are not the model's (LoRA: a frozen base plus adapters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import jax

from lmadapt.data.batch import Batch

if TYPE_CHECKING:  # only for annotations: the origin imports nothing of continual
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin


class Run(Protocol):
    """What a method may read of the finished run when it publishes (a `lmadapt.session.Session` is one)."""

    model: Any

    def batch(self, step: int) -> Batch: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """One continual method. Subclasses set `name` and override the hooks they need."""

    name: ClassVar[str]
    SELECTORS: ClassVar[Mapping[str, Callable[[str], bool]]] = {}  # named params selectors it brings
    frozen: ClassVar[tuple[str, ...]] = ()  # named selectors whose params this method never trains

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> Method | None:
        """The method as `cfg` configures it, or None when the run does not use it."""
        raise NotImplementedError

    def prepare(self, cfg: Config) -> Config:
        """The run's config, as this method needs it (called once, before the data is built)."""
        return cfg

    def kind(self) -> str | None:
        """The word for this method in the strategy's kind (e.g. "ewc" in "ewc+replay"); None: no word."""
        return self.name

    def describe(self) -> dict[str, Any] | None:
        """The method's entry in the version record's strategy, or None for none."""
        return None

    def artifacts(self, params: Any, run: Run, origin: Origin) -> dict[str, Any]:
        """Trees to publish with the new version (beside its params), by artifact name."""
        return {}


class WithRef(Method):
    """A method with constants in the train state: `TrainState.ref[name]` is a `Ref` of named fields."""

    def ref_shapes(self, params: Any, rng: jax.Array) -> Any:
        """The `Ref`'s shapes (with logical names) given the model params' boxed shapes."""
        raise NotImplementedError

    def load_ref(self, origin: Origin, params: Any, target: Any) -> Any:
        """The `Ref` for a run from `origin`, whose start params are `params`, onto `target`'s shardings."""
        raise NotImplementedError


class Penalty(WithRef):
    """A regulariser on the model's params, added once per step: the objective's `+ penalty(theta, ref)`."""

    def penalty(self, theta: Any, ref: Any) -> jax.Array:
        raise NotImplementedError


class TokenTerm(WithRef):
    """A per-token term: the step adds `term` (a sum over the batch's real tokens) to the data loss sum, and
    reports each of `sums` divided by the token count. Subclasses have a `data_weight` field: the data loss's
    weight beside the term."""

    sums: ClassVar[tuple[str, ...]] = ()

    def term(self, logits: jax.Array, batch: Batch, ref: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the weighted sum the objective adds, {name: raw sum} for each of `sums})."""
        raise NotImplementedError


class Layout(Method):
    """Trainable params other than the model's: `wrap` builds them around the model's params, `effective`
    gives the model's params back for the forward pass, `publishable` what the version stores."""

    def wrap(self, params: Any, rng: jax.Array) -> Any:
        raise NotImplementedError

    def wrap_shapes(self, params: Any, rng: jax.Array) -> Any:
        """`wrap` on the model params' boxed shapes."""
        raise NotImplementedError

    def model_params(self, params: Any) -> Any:
        """The model's own params inside the layout (what a start version's params load onto)."""
        raise NotImplementedError

    def effective(self, params: Any) -> Any:
        raise NotImplementedError

    def publishable(self, params: Any) -> tuple[Any, dict[str, Any]]:
        """(params of the new version, artifacts)."""
        raise NotImplementedError
