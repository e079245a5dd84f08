"""Diagonal Fisher (empirical and true) against a per-row brute force; EWC / L2-SP penalties; online EWC."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmadapt.config import ModelConfig
from lmadapt.continual.fisher import (
    accumulate_online,
    batch_key,
    ewc_penalty,
    fisher_diagonal,
    l2sp_penalty,
    sample_targets,
)
from lmadapt.model import Transformer, init_params

# Test-side jits compile with LLVM's optimisations off: about half the CPU compile time, same results up to rounding.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
MODEL = Transformer(CFG)


@functools.cache
def params():
    """Random params of the tiny model's shapes (no init compile: shapes by eval_shape, values from numpy)."""
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(CFG, jax.random.key(0))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), jnp.float32), shapes)


def make_batch(seed: int, rows: int, length: int, empty_rows: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """Random tokens; the last two positions of row 0 are padding (segment 0, mask 0); `empty_rows` fully masked."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[0, -2:] = 0
    loss_mask = (segment_ids > 0).astype(np.float32)
    loss_mask[list(empty_rows)] = 0.0
    return {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
            "segment_ids": jnp.asarray(segment_ids), "loss_mask": jnp.asarray(loss_mask)}


# One shape for all batches: each distinct shape costs a compile of the per-row gradient (seconds on CPU).
BATCHES = [make_batch(0, 3, 8), make_batch(1, 3, 8, empty_rows=(1,)), make_batch(2, 3, 8)]


def row_log_likelihood(p, tokens, positions, segment_ids, targets, mask):
    """sum_t mask_t log p(targets_t) of one row, written independently of lmadapt.continual.fisher."""
    logits = MODEL.apply({"params": p}, tokens[None], positions=positions[None], segment_ids=segment_ids[None])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(mask * jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])


row_grad = jax.jit(jax.grad(row_log_likelihood), compiler_options=FAST)
forward = jax.jit(lambda p, tokens, positions, segment_ids: MODEL.apply({"params": p}, tokens, positions=positions,
                                                                        segment_ids=segment_ids), compiler_options=FAST)


def brute_force_fisher(batches, kind, rng):
    """Python loop over rows, one jax.grad per row; fully masked rows excluded from the count."""
    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params())
    rows = 0
    for i, batch in enumerate(batches):
        if kind == "true":
            logits = forward(params(), batch["tokens"], batch["positions"], batch["segment_ids"])
            targets = sample_targets(logits, batch_key(rng, i))
        else:
            targets = batch["targets"]
        for r in range(batch["tokens"].shape[0]):
            g = row_grad(params(), batch["tokens"][r], batch["positions"][r], batch["segment_ids"][r], targets[r],
                         batch["loss_mask"][r])
            total = jax.tree.map(lambda t, x: t + np.square(np.asarray(x, np.float64)), total, g)
            rows += int(np.any(np.asarray(batch["loss_mask"][r]) != 0))
    return jax.tree.map(lambda t: t / rows, total)


def assert_trees_close(actual, expected, rtol):
    flat_a, flat_e = jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        assert a.dtype == jnp.float32, path
        # atol: a float32 rounding floor relative to the leaf's scale, for entries that are ~0 by cancellation.
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-6 * float(np.max(e)), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_fisher_matches_brute_force(kind):
    rng = jax.random.key(7, impl="rbg")  # any key type works; rbg compiles faster than threefry on CPU
    fisher = fisher_diagonal(params(), MODEL, iter(BATCHES), kind=kind, rng=rng)
    assert jax.tree.structure(fisher) == jax.tree.structure(params())
    assert_trees_close(fisher, brute_force_fisher(BATCHES, kind, rng), rtol=1e-5)
    assert all(float(np.min(x)) >= 0 and float(np.max(x)) > 0 for x in jax.tree.leaves(fisher))


def test_true_fisher_labels_differ_from_data_and_depend_on_rng():
    batch = BATCHES[0]
    logits = forward(params(), batch["tokens"], batch["positions"], batch["segment_ids"])
    rng = jax.random.key(0, impl="rbg")
    a, b = sample_targets(logits, batch_key(rng, 0)), sample_targets(logits, batch_key(rng, 1))
    assert a.shape == batch["targets"].shape and a.dtype == jnp.int32
    assert np.any(np.asarray(a) != np.asarray(b))
    assert np.any(np.asarray(a) != np.asarray(batch["targets"]))


def test_fully_masked_rows_do_not_count():
    """F over [batch 0, batch 1] is the row-weighted mean of the two: batch 1 counts 2 rows, not 3 (row 1 is empty)."""
    both = fisher_diagonal(params(), MODEL, BATCHES[:2], kind="empirical")
    f0 = fisher_diagonal(params(), MODEL, BATCHES[:1], kind="empirical")
    f1 = fisher_diagonal(params(), MODEL, BATCHES[1:2], kind="empirical")
    assert_trees_close(both, jax.tree.map(lambda a, b: (3 * a + 2 * b) / 5, f0, f1), rtol=1e-5)


def test_fisher_errors():
    empty = make_batch(0, 3, 8, empty_rows=(0, 1, 2))
    with pytest.raises(ValueError, match="no row with a nonzero loss_mask"):
        fisher_diagonal(params(), MODEL, [empty], kind="empirical")
    with pytest.raises(ValueError, match="needs an rng"):
        fisher_diagonal(params(), MODEL, [empty], kind="true")
    with pytest.raises(ValueError, match="kind must be"):
        fisher_diagonal(params(), MODEL, [empty], kind="exact")
    with pytest.raises(ValueError, match="lacks"):
        fisher_diagonal(params(), MODEL, [{k: v for k, v in empty.items() if k != "targets"}], kind="empirical")


def random_like(tree, seed, positive=False):
    """Standard-normal float32 numpy leaves (absolute values if `positive`) of `tree`'s shapes.

    Numpy throughout these tests' inputs and expectations: eager jax ops would compile once per leaf shape."""
    rng = np.random.default_rng(seed)
    transform = np.abs if positive else (lambda z: z)
    return jax.tree.map(lambda x: transform(rng.normal(size=x.shape)).astype(np.float32), tree)


def numpy_params():
    return jax.tree.map(np.asarray, params())


@functools.partial(jax.jit, compiler_options=FAST)
def penalties_and_grads(theta, anchor, fisher, lam):
    """(ewc, l2sp) values and their gradients w.r.t. theta, in one compile."""
    ewc = jax.value_and_grad(ewc_penalty)(theta, anchor, fisher, lam)
    l2 = jax.value_and_grad(l2sp_penalty)(theta, anchor, lam)
    return ewc, l2


def test_penalty_gradients_match_closed_forms():
    theta = numpy_params()
    anchor = jax.tree.map(lambda x, n: x + np.float32(0.1) * n, theta, random_like(theta, 1))
    fisher = random_like(theta, 2, positive=True)
    lam = np.float32(0.37)
    (ewc_value, ewc_grad), (l2_value, l2_grad) = penalties_and_grads(theta, anchor, fisher, lam)
    for g, f, x, a in zip(*map(jax.tree.leaves, (ewc_grad, fisher, theta, anchor)), strict=True):
        np.testing.assert_allclose(g, lam * f * (x - a), rtol=1e-6, atol=1e-9)
    for g, x, a in zip(*map(jax.tree.leaves, (l2_grad, theta, anchor)), strict=True):
        np.testing.assert_allclose(g, lam * (x - a), rtol=1e-6, atol=1e-9)
    # The values themselves, against float64.
    diffs = [x.astype(np.float64) - a for x, a in zip(jax.tree.leaves(theta), jax.tree.leaves(anchor), strict=True)]
    expected_ewc = lam / 2 * sum(np.sum(f * d**2) for f, d in zip(jax.tree.leaves(fisher), diffs, strict=True))
    np.testing.assert_allclose(float(ewc_value), expected_ewc, rtol=1e-5)
    np.testing.assert_allclose(float(l2_value), lam / 2 * sum(np.sum(d**2) for d in diffs), rtol=1e-5)
    assert ewc_value.dtype == l2_value.dtype == jnp.float32


def test_penalties_cover_only_anchor_leaves():
    """An anchor holding only layers_0: gradients elsewhere are exactly zero; fisher/params may hold more leaves."""
    theta = numpy_params()
    anchor = {"layers_0": jax.tree.map(lambda x: x + np.float32(1.0), theta["layers_0"])}
    fisher = jax.tree.map(np.ones_like, theta)
    (_, grad), (l2_value, _) = penalties_and_grads(theta, anchor, fisher, np.float32(2.0))
    for path, g in jax.tree_util.tree_flatten_with_path(grad)[0]:
        keys = [entry.key for entry in path]
        if keys[0] == "layers_0":  # lam * F * (theta - theta*) = 2 * (theta - (theta + 1)), float32-rounded
            expected = 2.0 * (functools.reduce(dict.get, keys, theta) - functools.reduce(dict.get, keys, anchor))
        else:
            expected = np.zeros(g.shape, np.float32)
        np.testing.assert_array_equal(g, expected, err_msg=str(keys))
    n_anchor = sum(x.size for x in jax.tree.leaves(anchor))
    np.testing.assert_allclose(float(l2_value), n_anchor, rtol=1e-6)  # (2 / 2) * sum of 1**2 over the anchor
    with pytest.raises(ValueError, match=r"fisher has no leaf at \['layers_0'\]"):
        ewc_penalty(theta, anchor, {"final_norm": fisher["final_norm"]}, 1.0)
    with pytest.raises(ValueError, match=r"params has no leaf at \['layers_0'\]"):
        l2sp_penalty({"final_norm": theta["final_norm"]}, anchor, 1.0)


def test_online_accumulation_three_steps():
    f1, f2, f3 = (random_like(params(), s, positive=True) for s in (3, 4, 5))
    gamma = 0.8
    step = jax.jit(accumulate_online, compiler_options=FAST)
    acc = accumulate_online(None, f1, gamma)
    acc = step(acc, f2, gamma)
    acc = step(acc, f3, gamma)
    for got, a, b, c in zip(*map(jax.tree.leaves, (acc, f1, f2, f3)), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, gamma**2 * a + gamma * b + c, rtol=1e-6)
