"""A run's continual strategy: the methods it uses, built once from the config (`build`).

    strategy = build(cfg, origin)            # origin: where the run starts (lmadapt.lineage.origin)
    cfg = strategy.prepare(cfg)              # e.g. replay sources completed from the parent's record
    params = strategy.wrap(start_params, rng); ref = strategy.load_ref(origin, start_params, targets)

The train state's layout follows from it: the trainable params (the model's, or a LoRA layout's), the
constants in `TrainState.ref` (one `Ref` of named fields per method that keeps some) and the objective's
terms (`lmadapt.train_step.Objective`). A new method is one module plus one line in `METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax

from lmadapt.continual import replay
from lmadapt.continual.average import Average
from lmadapt.continual.distill import Distill
from lmadapt.continual.ewc import EWC, PublishFisher
from lmadapt.continual.l2sp import L2SP
from lmadapt.continual.lora import LoRA
from lmadapt.continual.method import Layout, Method, Penalty, Run, TokenTerm, WithRef
from lmadapt.continual.replay import Replay
from lmadapt.lineage.store import Lineage
from lmadapt.optim import schedule_entry

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin

# Every method, in the order its word appears in the strategy's kind ("l2sp+ewc+replay").
METHODS: tuple[type[Method], ...] = (L2SP, EWC, Distill, LoRA, Average, Replay, PublishFisher)
# Named params selectors the methods bring to `optimizer.groups` (whether or not this run uses them).
SELECTORS: Mapping[str, Callable[[str], bool]] = {k: v for m in METHODS for k, v in m.SELECTORS.items()}


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The methods a run uses, and what follows from them for the train state."""

    methods: tuple[Method, ...]

    @property
    def layout(self) -> Layout | None:
        return next((m for m in self.methods if isinstance(m, Layout)), None)

    @property
    def with_ref(self) -> tuple[WithRef, ...]:
        return tuple(m for m in self.methods if isinstance(m, WithRef))

    @property
    def penalties(self) -> tuple[Penalty, ...]:
        return tuple(m for m in self.methods if isinstance(m, Penalty))

    @property
    def token_terms(self) -> tuple[TokenTerm, ...]:
        return tuple(m for m in self.methods if isinstance(m, TokenTerm))

    @property
    def frozen(self) -> tuple[str, ...]:
        """Named selectors whose params the methods themselves freeze (the base under LoRA)."""
        return tuple(sel for m in self.methods for sel in m.frozen)

    def prepare(self, cfg: Config) -> Config:
        for m in self.methods:
            cfg = m.prepare(cfg)
        return cfg

    # --- the train state -------------------------------------------------------------------------------------
    def param_shapes(self, params: Any, rng: jax.Array) -> Any:
        """The trainable params' shapes given the model params' boxed shapes."""
        return self.layout.wrap_shapes(params, rng) if self.layout else params

    def wrap(self, params: Any, rng: jax.Array) -> Any:
        """The trainable params around a start version's params."""
        return self.layout.wrap(params, rng) if self.layout else params

    def model_params(self, params: Any) -> Any:
        """The model's params inside the trainable ones (or their shapes)."""
        return self.layout.model_params(params) if self.layout else params

    def ref_shapes(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        return {m.name: m.ref_shapes(params, rng) for m in self.with_ref}

    def load_ref(self, origin: Origin, params: Any, targets: Mapping[str, Any]) -> dict[str, Any]:
        """Every method's constants for a run from `origin` whose start params are `params`."""
        return {m.name: m.load_ref(origin, params, targets[m.name]) for m in self.with_ref}

    # --- the version it publishes ------------------------------------------------------------------------------
    def publishable(self, params: Any, run: Run, origin: Origin) -> tuple[Any, dict[str, Any]]:
        """(params of the new version, artifacts): merged LoRA params and adapters, a Fisher, ..."""
        params, artifacts = self.layout.publishable(params) if self.layout else (params, {})
        for m in self.methods:
            if isinstance(m, Average):  # before the artifacts: a Fisher is of the params the version holds
                params = m.publish(params, origin)
        for m in self.methods:
            artifacts.update(m.artifacts(params, run, origin))
        return params, artifacts

    def kind(self, table: list[dict[str, Any]]) -> str:
        """e.g. "l2sp+ewc", "lora", "freeze+replay"; "full" or "pretrain" without any method."""
        words = [w for m in self.methods if not isinstance(m, Replay) and (w := m.kind())]
        if not self.frozen and any(r["frozen"] for r in table):
            words.append("freeze")  # frozen optimizer groups, beyond what the methods freeze themselves
        words += [w for m in self.methods if isinstance(m, Replay) and (w := m.kind())]
        return "+".join(words)

    def describe(self, cfg: Config, table: list[dict[str, Any]]) -> dict[str, Any]:
        """The strategy as the version records it: groups, schedule (with its peak and start and end positions,
        which a child's rewarm_fraction and carry read), optimizer state, replay, each method."""
        s, vid = cfg.schedule, cfg.init.from_version
        levers = (s.rewarm_fraction is not None or s.carry) and vid and cfg.lineage.dir
        parent = Lineage(cfg.lineage.dir).record(vid) if levers else None
        out: dict[str, Any] = {
            "groups": table,
            "frozen_params": sum(r["params"] for r in table if r["frozen"]),
            "trainable_params": sum(r["params"] for r in table if not r["frozen"]),
            "schedule": {**dataclasses.asdict(s), **schedule_entry(cfg, parent)}, "lr": cfg.optimizer.lr,
            "optimizer_state": "carried" if cfg.optimizer.carry_state else "fresh",
            "replay": replay.describe(cfg),
        }
        for m in self.methods:
            entry = m.describe()
            if entry is not None:
                out[m.name] = entry
        started = cfg.init.from_version or cfg.init.from_hf
        out["kind"] = self.kind(table) or ("full" if started else "pretrain")
        return out


def build(cfg: Config, origin: Origin | None = None) -> Strategy:
    """The strategy `cfg` configures for a run from `origin` (None: no lineage to read, e.g. a test's session)."""
    return Strategy(tuple(m for cls in METHODS if (m := cls.from_config(cfg, origin)) is not None))
