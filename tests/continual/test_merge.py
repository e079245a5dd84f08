"""Merging params trees: interpolation, weighted averaging, dtypes, and mismatch errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmadapt.continual.merge import average, check_compatible, interpolate


def tree(x: float, y: float, dtype=jnp.float32):
    return {"layer": {"kernel": jnp.full((2, 3), x, dtype), "bias": jnp.array([x, y], dtype)}, "scale": jnp.float32(y)}


def test_interpolate_hand_values():
    out = interpolate(tree(1.0, 2.0), tree(3.0, -2.0), 0.25)
    np.testing.assert_allclose(out["layer"]["kernel"], np.full((2, 3), 1.5), rtol=1e-7)  # 0.75*1 + 0.25*3
    np.testing.assert_allclose(out["layer"]["bias"], [1.5, 1.0], rtol=1e-7)  # 0.75*2 + 0.25*(-2) = 1
    np.testing.assert_allclose(out["scale"], 1.0, rtol=1e-7)


def test_interpolate_endpoints_exact():
    rng = np.random.default_rng(0)
    a = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "v": jnp.asarray(rng.normal(size=3), jnp.bfloat16)}
    b = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "v": jnp.asarray(rng.normal(size=3), jnp.bfloat16)}
    for alpha, expected in ((0.0, a), (1.0, b)):
        out = interpolate(a, b, alpha)
        for key in a:
            assert out[key].dtype == a[key].dtype
            np.testing.assert_array_equal(np.asarray(out[key], np.float32), np.asarray(expected[key], np.float32))


def test_interpolate_dtype_follows_first_tree_and_jits():
    a, b = tree(1.0, 2.0, jnp.bfloat16), tree(2.0, 4.0, jnp.float32)
    out = jax.jit(interpolate)(a, b, jnp.float32(0.5))
    assert out["layer"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["layer"]["bias"], np.float32), [1.5, 3.0])


def test_average_uniform_and_weighted():
    trees = [tree(1.0, 0.0), tree(2.0, 3.0), tree(6.0, 6.0)]
    uniform = average(trees)
    np.testing.assert_allclose(uniform["layer"]["kernel"], np.full((2, 3), 3.0), rtol=1e-6)
    np.testing.assert_allclose(uniform["layer"]["bias"], [3.0, 3.0], rtol=1e-6)
    # weights [2, 1, 1] normalise to [0.5, 0.25, 0.25]: 0.5*1 + 0.25*2 + 0.25*6 = 2.5; 0 + 0.75 + 1.5 = 2.25
    weighted = average(trees, [2.0, 1.0, 1.0])
    np.testing.assert_allclose(weighted["layer"]["bias"], [2.5, 2.25], rtol=1e-6)
    scaled = average(trees, [20.0, 10.0, 10.0])  # only the ratios matter
    for x, y in zip(jax.tree.leaves(weighted), jax.tree.leaves(scaled), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    # A one-hot weight gives that tree back exactly; a single tree gives itself back.
    for x, y in zip(jax.tree.leaves(average(trees, [0, 1, 0])), jax.tree.leaves(trees[1]), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(average(trees[:1])), jax.tree.leaves(trees[0]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_average_equals_interpolate_for_two():
    a, b = tree(1.0, -1.0), tree(5.0, 7.0)
    for x, y in zip(jax.tree.leaves(average([a, b], [0.7, 0.3])), jax.tree.leaves(interpolate(a, b, 0.3)),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_boxed_leaves_are_kept():
    a = {"w": nn.Partitioned(jnp.ones((2, 2)), ("embed", "mlp"))}
    b = {"w": nn.Partitioned(jnp.zeros((2, 2)), ("embed", "mlp"))}
    out = average([a, b])
    assert isinstance(out["w"], nn.Partitioned) and out["w"].names == ("embed", "mlp")
    np.testing.assert_array_equal(out["w"].value, np.full((2, 2), 0.5))


def test_mismatch_messages_name_the_path():
    a = tree(1.0, 2.0)
    missing = {"layer": {"kernel": a["layer"]["kernel"]}, "scale": a["scale"]}
    with pytest.raises(ValueError, match=r"structure at \['layer'\]\['bias'\]: present in a, missing in b"):
        interpolate(a, missing, 0.5)
    with pytest.raises(ValueError, match=r"structure at \['layer'\]\['bias'\]: present in b, missing in a"):
        interpolate(missing, a, 0.5)
    extra = {**a, "zzz": jnp.zeros(1)}
    with pytest.raises(ValueError, match=r"structure at \['zzz'\]: present in trees\[2\], missing in trees\[0\]"):
        average([a, a, extra])
    reshaped = {**a, "layer": {**a["layer"], "kernel": jnp.zeros((3, 2))}}
    with pytest.raises(ValueError, match=r"shape at \['layer'\]\['kernel'\]: trees\[0\] has \(2, 3\), "
                                         r"trees\[1\] has \(3, 2\)"):
        average([a, reshaped])
    check_compatible(a, tree(5.0, 6.0))  # compatible trees pass silently


def test_bad_weights():
    trees = [tree(1.0, 2.0), tree(2.0, 3.0)]
    with pytest.raises(ValueError, match="2 params trees"):
        average(trees, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        average(trees, [1.0, -0.5])
    with pytest.raises(ValueError, match="positive sum"):
        average(trees, [0.0, 0.0])
    with pytest.raises(ValueError, match="at least one"):
        average([])
