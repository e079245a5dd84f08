"""Continual-update strategies inside the sharded train step: freezing, per-group rates, regularisers,
distillation, LoRA; each gives the same losses on 8 devices as on one."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from lmadapt.continual import lora, strategy
from lmadapt.continual.distill import kl_sums
from lmadapt.continual.method import Penalty
from lmadapt.session import build

STARTED = ["init.from_version=parent", "lineage.dir=/nonexistent"]  # what regularisers require to validate


def by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in flat}


@pytest.fixture(scope="module")
def parent_params():
    """Host copy of a trained-looking parent: random init with a larger scale."""
    from tests_paths import TINY

    from lmadapt.config import load_config
    from lmadapt.model import init_params

    cfg = load_config(TINY)
    params = nn.unbox(init_params(cfg.model, jax.random.PRNGKey(42)))
    return jax.tree.map(np.asarray, params)


def start(session, parent, seed=0):
    """A step-0 state from `parent` params with every constant a strategy may need."""
    target = session.abstract_state.params
    target = target.get("base", target)
    params = jax.device_put(parent, jax.tree.map(lambda t: t.sharding, target))
    ref = {}
    for name, shapes in session.abstract_state.ref.items():  # every field is params-shaped: anchor, fisher, teacher
        fields = {f: parent if f != "fisher" else jax.tree.map(lambda p: np.abs(p) * 10 + 0.1, parent)
                  for f in shapes.__dataclass_fields__}
        ref[name] = jax.device_put(shapes.replace(**fields), jax.tree.map(lambda x: x.sharding, shapes))
    with session.activate():
        return session.init_from_fn(params, ref, jax.random.PRNGKey(seed))


def run(session, state, steps=3):
    losses, metrics = [], []
    with session.activate():
        for step in range(steps):
            state, m = session.step_fn(state, session.batch(step))
            losses.append(float(m["loss"]))
            metrics.append(jax.device_get(m))
    return state, losses, metrics


def test_frozen_groups_are_bit_identical_and_hold_no_optimizer_state(tiny_config, parent_params):
    cfg = tiny_config("mesh.data=8", "optimizer.groups=[{name: lower, select: ['attention+layers:0-0', embeddings], "
                                     "frozen: true}]", *STARTED)
    session = build(cfg)
    state, losses, _ = run(session, start(session, parent_params))
    after = by_path(jax.device_get(state.params))
    before = by_path(parent_params)
    for path in before:
        frozen = path.startswith("embed/") or path.startswith("layers_0/attn/")
        if frozen:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:
            assert not np.array_equal(after[path], before[path]), path
    n_frozen = sum(v.size for k, v in before.items() if k.startswith(("embed/", "layers_0/attn/")))
    n_total = sum(v.size for v in before.values())
    # Adam keeps two moments per trainable parameter and nothing for frozen ones.
    state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert state_size == 2 * (n_total - n_frozen)
    rows = {r["group"]: r for r in session.groups.table}
    assert rows["lower"]["frozen"] and rows["lower"]["params"] == n_frozen and rows["lower"]["lr"] == 0.0


def test_per_group_learning_rates_scale_the_update(tiny_config, parent_params):
    # With Adam, the first update of every parameter with a non-zero gradient is lr * sign(g): the
    # ratio of update sizes between groups is exactly the ratio of their learning rates.
    cfg = tiny_config("mesh.data=1", "schedule.kind=constant", "schedule.warmup_steps=0", "optimizer.lr=1e-3",
                      "optimizer.weight_decay=0", "optimizer.eps=1e-12",
                      "optimizer.groups=[{name: head, select: [head], lr_scale: 3.0}, "
                      "{name: mlp, select: [mlp], lr_scale: 0.5}]", *STARTED)
    session = build(cfg, devices=jax.devices()[:1])
    state, _, _ = run(session, start(session, parent_params), steps=1)
    after, before = by_path(jax.device_get(state.params)), by_path(parent_params)
    for prefix, scale in (("lm_head/", 3.0), ("layers_1/mlp/", 0.5), ("layers_1/attn/", 1.0)):
        deltas = np.concatenate([np.abs(after[k] - before[k]).ravel() for k in before if k.startswith(prefix)])
        moved = deltas[deltas > 0]
        np.testing.assert_allclose(np.median(moved), 1e-3 * scale, rtol=1e-3, err_msg=prefix)


def test_regularisers_and_distillation_report_their_terms(tiny_config, parent_params):
    cfg = tiny_config("mesh.data=1", "continual.l2sp=2.0", "continual.ewc=0.5", "continual.distill.weight=1.0",
                      "schedule.warmup_steps=0", *STARTED)
    session = build(cfg, devices=jax.devices()[:1])
    state = start(session, parent_params)
    _, _, metrics = run(session, state, steps=2)
    # At step 0 the model is its anchor and its teacher: every added term is exactly zero.
    assert metrics[0]["penalty"] == 0.0 and abs(metrics[0]["kl"]) < 1e-6
    np.testing.assert_allclose(metrics[0]["objective"], metrics[0]["loss"], rtol=1e-6)
    assert metrics[1]["penalty"] > 0 and metrics[1]["kl"] > 0


@struct.dataclass
class ShrinkRef:
    center: object


@dataclasses.dataclass(frozen=True)
class Shrink(Penalty):
    """A method written outside lmadapt: (mu / 2) ||theta - c||^2 toward a center its load_ref makes (zeros)."""

    mu: float
    name = "shrink"

    @classmethod
    def from_config(cls, cfg, origin):
        return cls(0.25)

    def ref_shapes(self, params, rng):
        return ShrinkRef(center=params)

    def load_ref(self, origin, params, target):
        return ShrinkRef(center=jax.tree.map(jnp.zeros_like, params))

    def penalty(self, theta, ref):
        squares = jax.tree.map(lambda t, c: jnp.sum(jnp.square(t - c)), theta, ref.center)
        return self.mu / 2 * sum(jax.tree.leaves(squares))

    def describe(self):
        return {"mu": self.mu}


def test_a_new_method_is_one_class_and_one_registry_line(tiny_config, parent_params, monkeypatch):
    monkeypatch.setattr(strategy, "METHODS", (*strategy.METHODS, Shrink))
    session = build(tiny_config("mesh.data=1", "schedule.warmup_steps=0", *STARTED), devices=jax.devices()[:1])
    params = jax.device_put(parent_params, jax.tree.map(lambda t: t.sharding, session.abstract_state.params))
    ref = session.strategy.load_ref(None, params, session.abstract_state.ref)
    with session.activate():
        state = session.init_from_fn(params, ref, jax.random.PRNGKey(0))
    _, _, metrics = run(session, state, steps=1)
    expected = 0.25 / 2 * sum(float(np.sum(np.square(p.astype(np.float64)))) for p in jax.tree.leaves(parent_params))
    np.testing.assert_allclose(metrics[0]["penalty"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["objective"], metrics[0]["loss"] + expected, rtol=1e-5)
    record = session.strategy.describe(session.cfg, list(session.groups.table))
    assert record["shrink"] == {"mu": 0.25} and record["kind"] == "shrink"


def test_kl_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    teacher = jnp.asarray(rng.normal(size=(1, 3, 7)), jnp.float32)
    student = jnp.asarray(rng.normal(size=(1, 3, 7)), jnp.float32)
    mask = jnp.asarray([[1.0, 0.0, 1.0]])
    assert abs(float(kl_sums(teacher, teacher, 2.0, mask))) < 1e-6
    grad = jax.grad(lambda s: kl_sums(teacher, s, 2.0, mask))(student)
    eps = 1e-2
    for idx in [(0, 0, 0), (0, 0, 3), (0, 2, 6), (0, 1, 2)]:
        bump = jnp.zeros_like(student).at[idx].set(eps)
        fd = (kl_sums(teacher, student + bump, 2.0, mask) - kl_sums(teacher, student - bump, 2.0, mask)) / (2 * eps)
        np.testing.assert_allclose(float(grad[idx]), float(fd), atol=2e-4)
    assert float(jnp.abs(grad[0, 1]).max()) == 0.0  # masked position: no gradient


def test_lora_starts_as_the_parent_and_trains_only_adapters(tiny_config, parent_params):
    cfg = tiny_config("mesh.data=1", "continual.lora.rank=4", "continual.lora.targets=[q, v, down]", *STARTED)
    plain = build(tiny_config("mesh.data=1", *STARTED), devices=jax.devices()[:1])
    adapted = build(cfg, devices=jax.devices()[:1])
    s0, s1 = start(plain, parent_params), start(adapted, parent_params)
    with plain.activate():
        ref = plain.evaluate(s0.params)["loss"]
    with adapted.activate():
        assert adapted.evaluate(s1.params)["loss"] == ref  # B = 0: exactly the parent's function
    state, _, _ = run(adapted, s1, steps=2)
    base = by_path(jax.device_get(state.params["base"]))
    for k, v in by_path(parent_params).items():
        np.testing.assert_array_equal(base[k], v)
    assert np.abs(np.asarray(state.params["lora"]["layers_0"]["attn"]["q"]["b"])).max() > 0
    merged = lora.merge(state.params["base"], state.params["lora"], adapted.strategy.layout.scale)
    assert not np.array_equal(np.asarray(merged["layers_0"]["attn"]["q"]["kernel"]),
                              parent_params["layers_0"]["attn"]["q"]["kernel"])


# Combined so each compile covers several strategies (8-device compiles dominate this file's time).
STRATEGIES = {
    "freeze+l2sp+ewc": ["optimizer.groups=[{name: low, select: ['layers:0-0'], frozen: true}]",
                        "continual.l2sp=1.0", "continual.ewc=0.3"],
    "lwf+microbatches": ["continual.distill.weight=0.7", "continual.distill.temperature=1.5",
                         "train.microbatches=2"],
    "lora": ["continual.lora.rank=4", "continual.lora.targets=[q, k, v, o, gate, up, down]"],
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_is_the_same_on_8_devices(tiny_config, parent_params, name):
    one = build(tiny_config("mesh.data=1", *STARTED, *STRATEGIES[name]), devices=jax.devices()[:1])
    eight = build(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *STARTED, *STRATEGIES[name]))
    _, ref, _ = run(one, start(one, parent_params))
    _, got, _ = run(eight, start(eight, parent_params))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[2] < ref[0]
