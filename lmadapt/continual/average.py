"""Weight averaging along the chain: WiSE-FT toward the parent, and an EMA of the params during training.

    continual.average.wise: 0.5     # published = (1 - wise) * parent + wise * trained; needs init.from_version
    continual.average.ema: 0.999    # published = the EMA of the params (decay 0.999), kept in the train state

The EMA is `TrainState.ema` (float32, sharded like the params, checkpointed with the state), initialised to
the start params and updated by the train step after every applied update; `lmadapt.train_step.final_params`
gives it back in the params' dtypes at publish. With both on, WiSE interpolates between the parent and the EMA.

WiSE reads the parent at publish time from the origin (`origin.load_params`), not from a copy kept in the train
state: a kept copy would cost one params-sized buffer in device memory for the whole run and in every
checkpoint, whereas a load at publish costs it only transiently, when the gradients and activations of
training are gone (so it never raises the run's peak), and nothing when wise is 1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from lmadapt.continual.method import Method

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.continual.strategy import Strategy
    from lmadapt.lineage.origin import Origin


@functools.partial(jax.jit, static_argnums=2)
def interpolate(parent: Any, child: Any, alpha: float) -> Any:
    """(1 - alpha) * parent + alpha * child per leaf, computed in float32 and cast to the child's dtype.

    Exact at the endpoints: 1 gives `child` and 0 gives `parent` bit for bit (cast to the child's dtype). The
    formula alone is exact there for finite values except for the sign of zeros (0 * -x is -0), so the
    endpoints return the tree itself.
    """
    if alpha == 1:
        return child
    if alpha == 0:
        return jax.tree.map(lambda p, c: p.astype(c.dtype), parent, child)

    def mix(p: jax.Array, c: jax.Array) -> jax.Array:
        return ((1 - alpha) * p.astype(jnp.float32) + alpha * c.astype(jnp.float32)).astype(c.dtype)

    return jax.tree.map(mix, parent, child)


@dataclasses.dataclass(frozen=True)
class Average(Method):
    """WiSE-FT (`wise`: the trained params' weight against the parent's, None: off) and an EMA (`ema`: decay)."""

    wise: float | None
    ema: float
    name = "average"

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> Average | None:
        a = cfg.continual.average
        return cls(a.wise, a.ema) if a.wise is not None or a.ema else None

    def kind(self) -> str | None:
        return "+".join(w for w, on in (("ema", bool(self.ema)), ("wise", self.wise is not None)) if on)

    def describe(self) -> dict[str, Any]:
        return {"wise": self.wise, "ema": self.ema}

    @property
    def changes_params(self) -> bool:
        """Whether what the run publishes differs from the params it trained (wise 1 without EMA does not)."""
        return bool(self.ema) or self.wise not in (None, 1)

    def publish(self, params: Any, origin: Origin) -> Any:
        """The published model params: WiSE between the parent (loaded from `origin` onto `params`' shardings
        and dtypes) and `params` (the trained ones, or their EMA)."""
        if self.wise is None or self.wise == 1:
            return params  # nothing of the parent in it: no need to read it
        assert origin.load_params is not None  # validated: wise needs init.from_version
        target = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
        return interpolate(origin.load_params(target), params, self.wise)


def of(strategy: Strategy) -> Average | None:
    """The strategy's averaging method, if it has one."""
    return next((m for m in strategy.methods if isinstance(m, Average)), None)


def ema_decay(strategy: Strategy) -> float:
    """The EMA decay the train step applies (0: no EMA in the train state)."""
    avg = of(strategy)
    return avg.ema if avg is not None else 0.0
