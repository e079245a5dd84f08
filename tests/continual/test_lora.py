"""LoRA adapters: layout and init, exact no-op at B = 0, merge against a float64 numpy reference (llama and gpt2,
unrolled and scanned layers), gradients reaching the adapters, dtypes, logical names."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmadapt.config import ModelConfig
from lmadapt.continual.lora import TARGETS, box_lora, delta, init_lora, lora_scale, merge
from lmadapt.model import Transformer, init_params

# Test-side jits compile with LLVM's optimisations off: about half the CPU compile time, same results up to rounding.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
RANK = 4
key = functools.partial(jax.random.key, impl="rbg")  # compiles much faster than threefry on CPU
SCALE = lora_scale(alpha=8.0, rank=RANK)


def tiny(family: str, scan: bool = False) -> ModelConfig:
    extra = {"n_kv_heads": 2} if family == "llama" else {"tie_embeddings": True}  # llama: grouped-query k/v
    return ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                       scan_layers=scan, **extra)


@functools.cache
def boxed_shapes(family: str, scan: bool = False):
    return jax.eval_shape(lambda: init_params(tiny(family, scan), key(0)))


def stacked(tree):
    """`lmadapt.model.stack_layers` (the scan_layers layout) in numpy: eager jnp.stack compiles per leaf shape."""
    out = {name: value for name, value in tree.items() if not name.startswith("layers_")}
    n = len(tree) - len(out)
    blocks = [tree[f"layers_{i}"] for i in range(n)]
    out["layers"] = jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *blocks)
    return out


@functools.cache
def base_params(family: str, scan: bool = False):
    """Random unrolled params of the model's shapes (numpy values: no init compile); stacked for `scan`."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), jnp.float32),
                          nn.unbox(boxed_shapes(family)))
    return stacked(params) if scan else params


@functools.cache
def forward(family: str, scan: bool = False):
    model = Transformer(tiny(family, scan))
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens), compiler_options=FAST)


@functools.cache
def initial_lora(family: str, scan: bool = False):
    return init_lora(base_params(family, scan), TARGETS, RANK, key(0))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
CASES = [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)]
jit_merge = jax.jit(merge, compiler_options=FAST)


def randomise_b(lora, seed: int = 0):
    rng = np.random.default_rng(seed)

    def walk(node):
        if set(node) == {"a", "b"}:
            return {"a": node["a"], "b": jnp.asarray(rng.normal(0.0, 0.5, node["b"].shape), jnp.float32)}
        return {k: walk(v) for k, v in node.items()}

    return walk(lora)


def entries(tree, path=()):
    """(path, {"a", "b"}) for every adapter in a lora tree."""
    if set(tree) == {"a", "b"}:
        return [(path, tree)]
    return [item for key in sorted(tree) for item in entries(tree[key], (*path, key))]


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# The update of each projection written out from lmadapt.model's einsum equations (r: the rank axis).
EQUATIONS = {"q": "dr,rhk->dhk", "k": "dr,rhk->dhk", "v": "dr,rhk->dhk", "o": "hkr,rd->hkd",
             "gate": "ir,ro->io", "up": "ir,ro->io", "down": "ir,ro->io"}


def numpy_merge(params, lora, scale):
    """W + scale * A B per adapted kernel in float64 numpy (a leading "l" for stacked layers); a float64 tree."""
    merged = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for path, entry in entries(lora):
        kernel = at(merged, path)["kernel"]
        ins, outs = EQUATIONS[path[-1]].split("->")
        lead = "l" if kernel.ndim == len(outs) + 1 else ""
        a_sub, b_sub = ins.split(",")
        eq = f"{lead}{a_sub},{lead}{b_sub}->{lead}{outs}"
        a, b = np.asarray(entry["a"], np.float64), np.asarray(entry["b"], np.float64)
        at(merged, path)["kernel"] = kernel + scale * np.einsum(eq, a, b)
    return merged


@pytest.mark.parametrize("family,scan", CASES)
def test_layout_and_init(family, scan):
    params = base_params(family, scan)
    lora = initial_lora(family, scan)
    lead = (2,) if scan else ()
    blocks = ["layers"] if scan else ["layers_0", "layers_1"]
    assert sorted(lora) == blocks
    mlp = {"gate", "up", "down"} if family == "llama" else {"up", "down"}  # gpt2's MLP has no gate
    kv = 2 if family == "llama" else 4
    for block in blocks:
        assert set(lora[block]) == {"attn", "mlp"} and set(lora[block]["mlp"]) == mlp
        attn = lora[block]["attn"]
        assert attn["q"]["a"].shape == (*lead, 32, RANK) and attn["q"]["b"].shape == (*lead, RANK, 4, 8)
        assert attn["k"]["a"].shape == (*lead, 32, RANK) and attn["k"]["b"].shape == (*lead, RANK, kv, 8)
        assert attn["o"]["a"].shape == (*lead, 4, 8, RANK) and attn["o"]["b"].shape == (*lead, RANK, 32)
        assert lora[block]["mlp"]["down"]["a"].shape == (*lead, 64, RANK)
        assert lora[block]["mlp"]["down"]["b"].shape == (*lead, RANK, 32)
    for _, entry in entries(lora):
        assert entry["a"].dtype == entry["b"].dtype == jnp.float32
        assert not np.any(np.asarray(entry["b"]))
    # A ~ N(0, 1/fan_in): fan_in 32 for q (std 0.177), 64 for down (std 0.125).
    a_q = np.concatenate([np.ravel(at(lora, (b, "attn", "q"))["a"]) for b in blocks])
    a_down = np.concatenate([np.ravel(at(lora, (b, "mlp", "down"))["a"]) for b in blocks])
    assert abs(a_q.std() * np.sqrt(32) - 1) < 0.15 and abs(a_down.std() * np.sqrt(64) - 1) < 0.15
    # Deterministic in the rng, different per adapter.
    again = init_lora(params, TARGETS, RANK, key(0))
    for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(at(lora, (blocks[0], "attn", "q"))["a"], at(lora, (blocks[0], "attn", "k"))["a"])


def test_targets_subset_init_std_and_dtype():
    lora = init_lora(base_params("llama"), ("q", "v"), 2, jax.random.key(1), init_std=0.0, dtype=jnp.bfloat16)
    assert set(lora["layers_0"]) == {"attn"} and set(lora["layers_0"]["attn"]) == {"q", "v"}
    assert lora["layers_0"]["attn"]["q"]["a"].dtype == jnp.bfloat16 and not np.any(lora["layers_0"]["attn"]["q"]["a"])
    head = init_lora(base_params("llama"), ("lm_head",), 2, key(1))
    assert head["lm_head"]["a"].shape == (32, 2) and head["lm_head"]["b"].shape == (2, 64)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        init_lora(base_params("llama"), ("qkv",), 2, key(1))
    with pytest.raises(ValueError, match="no projection named"):
        init_lora(base_params("gpt2"), ("gate",), 2, key(1))
    with pytest.raises(ValueError, match="rank must be positive"):
        init_lora(base_params("llama"), TARGETS, 0, key(1))


@pytest.mark.parametrize("family,scan", CASES)
def test_zero_b_is_bit_identical(family, scan):
    params = base_params(family, scan)
    lora = initial_lora(family, scan)
    merged = jit_merge(params, lora, SCALE)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(forward(family, scan)(merged, TOKENS), forward(family, scan)(params, TOKENS))


@pytest.mark.parametrize("family,scan", CASES)
def test_merge_matches_float64_reference(family, scan):
    """merge() against W + s A B in float64 numpy per leaf (1e-6), and the logits of both merged models (1e-5).

    Under scan the adapters are the unrolled ones stacked, so the scanned model must also reproduce the unrolled
    model's logits: scan and unrolled layouts of the same adapters are the same model.
    """
    lora = randomise_b(initial_lora(family))
    params = base_params(family, scan)
    if scan:
        lora = stacked(lora)
        assert jax.tree.map(jnp.shape, initial_lora(family, scan)) == jax.tree.map(jnp.shape, lora)
    merged = jit_merge(params, lora, SCALE)
    reference = numpy_merge(params, lora, SCALE)
    adapted = {path for path, _ in entries(lora)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        keys = tuple(k.key for k in path)
        expected = at(reference, keys)
        assert leaf.dtype == jnp.float32
        if keys[:-1] in adapted and keys[-1] == "kernel":
            assert not np.allclose(leaf, at(params, keys), atol=1e-3), keys  # the update is not negligible
            np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=1e-6, err_msg=str(keys))
        else:
            np.testing.assert_array_equal(leaf, at(params, keys), err_msg=str(keys))
    logits = forward(family, scan)(merged, TOKENS)
    logits_ref = forward(family, scan)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), reference), TOKENS)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    if scan:
        unrolled = forward(family)(jit_merge(base_params(family), randomise_b(initial_lora(family)), SCALE), TOKENS)
        np.testing.assert_allclose(logits, unrolled, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_adapters():
    """At B = 0: dL/dB = s A^T dL/dW (nonzero for every adapter) and dL/dA = s dL/dW B^T = 0 exactly."""
    params, lora = base_params("llama"), initial_lora("llama")
    model = Transformer(tiny("llama"))

    def loss(p, adapters):
        logits = model.apply({"params": merge(p, adapters, SCALE)}, TOKENS[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], axis=-1))

    grad_params, grad_lora = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST)(params, lora)
    for path, entry in entries(lora):
        g = at(grad_lora, path)
        assert not np.any(np.asarray(g["a"])), path
        assert float(jnp.linalg.norm(g["b"])) > 0, path
        # Chain rule through merge: dL/dB[r, out] = s * sum_in A[in, r] dL/dW[in, out].
        n_in = g["a"].ndim - 1
        grad_w = np.asarray(at(grad_params, path)["kernel"], np.float64)
        a = np.asarray(entry["a"], np.float64)
        expected = SCALE * np.tensordot(a, grad_w, axes=(list(range(n_in)), list(range(n_in))))
        np.testing.assert_allclose(g["b"], expected, rtol=1e-4, atol=1e-7, err_msg=str(path))


def test_low_precision_kernels_merge_in_float32():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base_params("gpt2"))
    full = randomise_b(initial_lora("gpt2"))
    lora = {block: {"attn": {"q": full[block]["attn"]["q"]}, "mlp": {"up": full[block]["mlp"]["up"]}}
            for block in full}  # adapters on some projections only
    merged = jit_merge(params, lora, SCALE)
    for path, entry in entries(lora):
        kernel = at(params, path)["kernel"]
        expected = (kernel.astype(jnp.float32) + delta(entry, SCALE)).astype(jnp.bfloat16)
        assert path[-1] in ("q", "up")
        assert at(merged, path)["kernel"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(at(merged, path)["kernel"], np.float32),
                                      np.asarray(expected, np.float32))


def test_delta_with_lead_axes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 8, 2)), rng.normal(size=(3, 2, 5))
    out = delta({"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}, 0.5, lead_axes=1)
    np.testing.assert_allclose(out, 0.5 * np.einsum("lhkr,lrd->lhkd", a, b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        delta({"a": jnp.zeros((4, 2)), "b": jnp.zeros((3, 5))}, 1.0)


def test_merge_errors():
    params = base_params("llama")
    lora = init_lora(params, ("q",), RANK, key(0))
    with pytest.raises(ValueError, match="no module at layers_9"):
        merge(params, {"layers_9": lora["layers_0"]}, SCALE)
    wrong = {"layers_0": {"attn": {"q": {"a": jnp.zeros((32, RANK)), "b": jnp.zeros((RANK, 4, 7))}}}}
    with pytest.raises(ValueError, match="layers_0/attn/q"):
        merge(params, wrong, SCALE)


@pytest.mark.parametrize("scan", [False, True])
def test_boxed_params_and_logical_names(scan):
    boxed_values = jax.tree.map(lambda box, value: box.replace_boxed(value), boxed_shapes("llama", scan),
                                base_params("llama", scan), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    lora = randomise_b(init_lora(boxed_values, TARGETS, RANK, key(0)))
    merged = jit_merge(boxed_values, lora, SCALE)
    block = "layers" if scan else "layers_0"
    assert isinstance(merged[block]["attn"]["q"]["kernel"], nn.Partitioned)
    plain = jit_merge(base_params("llama", scan), lora, SCALE)
    for x, y in zip(jax.tree.leaves(nn.unbox(merged)), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(x, y)

    boxed = box_lora(boxed_values, lora)
    lead = ("layers",) if scan else ()
    q, o = boxed[block]["attn"]["q"], boxed[block]["attn"]["o"]
    assert q["a"].names == (*lead, "embed", None) and q["b"].names == (*lead, None, "heads", "head_dim")
    assert o["a"].names == (*lead, "heads", "head_dim", None) and o["b"].names == (*lead, None, "embed")
    assert boxed[block]["mlp"]["up"]["b"].names == (*lead, None, "mlp")
    for x, y in zip(jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(lora), strict=True):
        assert x is y


def test_lora_scale():
    assert lora_scale(16.0, 8) == 2.0
    with pytest.raises(ValueError):
        lora_scale(1.0, 0)
