"""Weight averaging (continual.average): WiSE-FT toward the parent is exact at its endpoints, the EMA kept in
the train state follows its recurrence, is checkpointed and sharded like the params, and is what is published."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests_paths import TINY

from lmadapt.checkpoint import Checkpointer
from lmadapt.config import CheckpointConfig, ConfigError, load_config
from lmadapt.continual.average import Average, interpolate
from lmadapt.model import init_params
from lmadapt.session import build

STARTED = ["init.from_version=parent", "lineage.dir=/nonexistent"]  # what wise requires to validate
DECAY = 0.75  # large (1 - decay) shares: every step moves the average visibly


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_bitwise(got, want):
    for g, w in zip(jax.tree.leaves(host(got)), jax.tree.leaves(host(want)), strict=True):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


@pytest.fixture(scope="module")
def parent():
    """Host params of the tiny config's model, as a version the run starts from would give them."""
    return host(nn.unbox(init_params(load_config(TINY).model, jax.random.PRNGKey(7))))


def start(session, params, seed=0):
    target = session.abstract_state.params
    with session.activate():
        return session.init_from_fn(jax.device_put(params, jax.tree.map(lambda t: t.sharding, target)), {},
                                    jax.random.PRNGKey(seed))


class FakeOrigin:
    """The part of `lmadapt.lineage.origin.Origin` WiSE reads: the parent's params onto a target."""

    def __init__(self, params):
        self.params, self.targets = params, []

    def load_params(self, target):
        self.targets.append(target)
        return jax.tree.map(lambda p, t: jax.device_put(jnp.asarray(p, t.dtype), t.sharding), self.params, target)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_wise_is_exact_at_its_endpoints_and_the_mean_between(dtype):
    rng = np.random.default_rng(0)
    parent = {"a": rng.normal(size=(4, 8)), "b": np.array([-0.0, 0.0, 1.5, -2.0])}  # signed zeros too
    child = {"a": rng.normal(size=(4, 8)), "b": np.array([0.0, -0.0, -1.0, 3.0])}
    parent, child = (jax.tree.map(lambda x: jnp.asarray(x, dtype), t) for t in (parent, child))
    assert_bitwise(interpolate(parent, child, 1.0), child)
    assert_bitwise(interpolate(parent, child, 0.0), parent)
    mean = jax.tree.map(lambda p, c: (0.5 * np.asarray(p, np.float32) + 0.5 * np.asarray(c, np.float32)).astype(dtype),
                        parent, child)
    assert_bitwise(interpolate(parent, child, 0.5), mean)

    origin = FakeOrigin(parent)
    assert_bitwise(Average(wise=1.0, ema=0.0).publish(child, origin), child)
    assert origin.targets == []  # nothing of the parent in it: not even read
    assert_bitwise(Average(wise=0.0, ema=0.0).publish(child, origin), parent)
    assert [t.dtype for t in jax.tree.leaves(origin.targets)] == [dtype, dtype]  # loaded in the params' dtype


def test_ema_follows_its_recurrence_and_resumes_bit_identically(tiny_config, parent, tmp_path):
    session = build(tiny_config("mesh.data=1", f"continual.average.ema={DECAY}", "schedule.warmup_steps=0",
                                *STARTED), devices=jax.devices()[:1])
    state = start(session, parent)
    assert_bitwise(state.ema, jax.tree.map(lambda p: p.astype(np.float32), parent))  # starts at the start params
    expected, trained = host(state.ema), []
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(async_save=False))
    with session.activate():
        for step in range(3):
            if step == 2:
                ckpt.save(2, state, {}, force=True)
            state, _ = session.step_fn(state, session.batch(step))
            trained.append(host(state.params))
            expected = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p.astype(np.float32), expected, trained[-1])
        final = host(state)
        resumed, _ = ckpt.restore(2, session.abstract_state)
        resumed, _ = session.step_fn(resumed, session.batch(2))
    ckpt.close()
    for got, want in zip(jax.tree.leaves(final.ema), jax.tree.leaves(expected), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(jax.tree.leaves(final.ema)[0], jax.tree.leaves(trained[-1])[0])  # an average, lagging
    assert_bitwise(resumed, final)  # the EMA is in the checkpoint: a resumed run is the same run


def test_ema_is_sharded_like_the_params_and_absent_when_off(tiny_config):
    on = build(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "continual.average.ema=0.9"))
    specs = jax.tree.map(lambda s: s.spec, on.state_shardings)
    assert specs.ema == specs.params and any(len(s) for s in jax.tree.leaves(specs.params))
    assert {a.dtype for a in jax.tree.leaves(on.abstract_state.ema)} == {jnp.dtype(jnp.float32)}
    off = build(tiny_config("mesh.data=8"))
    assert off.abstract_state.ema is None
    # No "ema" node at all without one: a checkpoint of such a run has the tree it had before EMAs existed.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(off.abstract_state)[0]]
    assert paths and not any("ema" in p for p in paths)
    assert jax.tree_util.tree_structure(off.abstract_state).num_nodes < jax.tree_util.tree_structure(
        on.abstract_state).num_nodes


@pytest.mark.parametrize(("overrides", "key"), [
    (["continual.average.wise=0.5"], "continual.average.wise"),  # no parent to average with
    (["continual.average.wise=1.5", *STARTED], "continual.average.wise"),
    (["continual.average.ema=1.0"], "continual.average.ema"),
    (["continual.average.ema=0.9", "continual.lora.rank=2", *STARTED], "continual.average.ema"),
])
def test_bad_averages_are_refused_by_name(tiny_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config(*overrides)
