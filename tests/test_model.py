"""The transformer: packing, attention implementations, scan/remat equivalence, logical names, HF shapes, bf16."""

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmadapt.config import DEFAULT_RULES, ModelConfig
from lmadapt.layers import einsum_attention
from lmadapt.model import (
    Transformer,
    count_params,
    init_cache,
    init_params,
    stack_layers,
    unstack_layers,
)

FAMILIES = ["llama", "gpt2"]


def tiny(family: str = "llama", **overrides) -> ModelConfig:
    """A 2-layer model; init_std 0.1 makes logits far from uniform, so masking mistakes show up clearly."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.1,
                dtype="float32")
    if family == "llama":
        base.update(n_kv_heads=2)  # grouped-query attention
    else:
        base.update(tie_embeddings=True)
    return ModelConfig(family=family, **{**base, **overrides})


def make_params(cfg: ModelConfig, seed: int = 0):
    # Jitted, with the "rbg" generator: on CPU, compiling the default threefry init costs seconds a model.
    return jax.jit(lambda key: nn.unbox(init_params(cfg, key)))(jax.random.key(seed, impl="rbg"))


@functools.cache
def params_of(family: str, scan: bool = False):
    """The tiny model's params, initialised once per test session (compiling an init costs seconds on CPU)."""
    params = make_params(tiny(family))
    return stack_layers(params) if scan else params


def forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    return jax.jit(Transformer(cfg).apply)({"params": params}, tokens, positions, segment_ids)


def packed_batch(cfg: ModelConfig, seed: int = 0, batch: int = 2, length: int = 16):
    """Random rows of three documents and two padding tokens, positions restarting per document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length))
    segment_ids = np.zeros((batch, length), int)
    positions = np.zeros((batch, length), int)
    for row in range(batch):
        cuts = [0, *sorted(rng.choice(np.arange(2, length - 3), 2, replace=False)), length - 2]
        for seg, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True), start=1):
            segment_ids[row, lo:hi] = seg
            positions[row, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)


@functools.cache
def reference_logits(family: str):
    """Logits of the tiny model (default settings) on `packed_batch`, the baseline other settings must match."""
    return forward(tiny(family), params_of(family), *packed_batch(tiny(family)))


def token_losses(logits, tokens):
    """Per-token next-token cross-entropy of one row: logits[t] predicts tokens[t + 1]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_match_documents_alone(family):
    cfg, params = tiny(family), params_of(family)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(1, cfg.vocab_size, 7), rng.integers(1, cfg.vocab_size, 5)
    pad = 4
    tokens = np.concatenate([doc_a, doc_b, np.zeros(pad, int)])[None]
    segment_ids = np.array([1] * 7 + [2] * 5 + [0] * pad)[None]
    positions = np.concatenate([np.arange(7), np.arange(5), np.zeros(pad, int)])[None]

    packed = forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))[0]
    assert np.isfinite(np.asarray(packed)).all()  # padding rows included
    alone_a = forward(cfg, params, jnp.asarray(doc_a[None]))[0]
    alone_b = forward(cfg, params, jnp.asarray(doc_b[None]))[0]
    np.testing.assert_allclose(token_losses(packed[:7], doc_a), token_losses(alone_a, doc_a), rtol=1e-5)
    np.testing.assert_allclose(token_losses(packed[7:12], doc_b), token_losses(alone_b, doc_b), rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_einsum_attention_matches_dot_product_attention(family):
    cfg = tiny(family)
    assert cfg.attention == "auto"  # what reference_logits ran with (jax's default implementation)
    batch = packed_batch(cfg)
    einsum = forward(dataclasses.replace(cfg, attention="einsum"), params_of(family), *batch)
    xla = forward(dataclasses.replace(cfg, attention="xla"), params_of(family), *batch)
    np.testing.assert_allclose(einsum, reference_logits(family), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(xla, einsum, atol=1e-5, rtol=1e-5)


@jax.jit
def _attention_pair(q, k, v, mask):
    reference = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return einsum_attention(q, k, v, mask, q.shape[-1] ** -0.5), reference


def test_einsum_attention_direct():
    """GQA grouping (query head h reads kv head h // 2) and segment masks, against jax's implementation."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((6, 6), bool))
    mask = mask[:, None]
    ours, expected = _attention_pair(q, k, v, mask)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
    # A fully masked row (never produced by the model, but possible in a hand-made mask) stays finite.
    assert np.isfinite(np.asarray(_attention_pair(q, k, v, jnp.zeros_like(mask))[0])).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_layers_matches_unrolled(family):
    cfg, params = tiny(family), params_of(family)
    stacked = stack_layers(params)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    # The stacked tree is exactly what the scanned model initialises (same structure and shapes).
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(scan_cfg, jax.random.key(0))))
    assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)

    scanned = forward(scan_cfg, stacked, *packed_batch(cfg))
    np.testing.assert_allclose(scanned, reference_logits(family), atol=1e-5, rtol=1e-5)
    round_trip = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), round_trip, params))


def test_stack_layers_keeps_logical_names():
    abstract = jax.eval_shape(lambda: init_params(tiny(), jax.random.key(0)))
    boxed = flax.core.meta.replace_boxed(abstract, params_of("llama"))
    stacked = stack_layers(boxed)
    assert stacked["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
    assert unstack_layers(stacked)["layers_1"]["attn"]["q"]["kernel"].names == ("embed", "heads", "head_dim")


@pytest.mark.parametrize("scan", [False, True])
def test_remat_variants_match(scan):
    cfg = tiny("llama", scan_layers=scan)
    params = params_of("llama", scan)
    tokens, positions, segment_ids = packed_batch(cfg)

    def loss_and_grads(remat):
        model = Transformer(dataclasses.replace(cfg, remat=remat))

        def loss(p):
            logits = model.apply({"params": p}, tokens, positions, segment_ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        return jax.value_and_grad(loss)(params)

    # One jit for all variants: a single compilation (remat's barriers keep each variant's recomputation).
    results = jax.jit(lambda: {remat: loss_and_grads(remat) for remat in ("none", "full", "dots", "dots_no_batch")})()
    base_loss, base_grads = results.pop("none")
    for loss, grads in results.values():
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, base_grads)


def _names(params):
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(family, scan):
    cfg = tiny(family, scan_layers=scan)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = _names(boxed)
    for path, leaf in leaves.items():
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
    block = "layers" if scan else "layers_0"
    lead = ("layers",) if scan else ()
    expected = {
        "embed/embedding": ("vocab", "embed"),
        "final_norm/scale": ("norm",),
        f"{block}/attn_norm/scale": lead + ("norm",),
        f"{block}/attn/q/kernel": lead + ("embed", "heads", "head_dim"),
        f"{block}/attn/k/kernel": lead + ("embed", "kv_heads", "head_dim"),
        f"{block}/attn/v/kernel": lead + ("embed", "kv_heads", "head_dim"),
        f"{block}/attn/o/kernel": lead + ("heads", "head_dim", "embed"),
        f"{block}/mlp/up/kernel": lead + ("embed", "mlp"),
        f"{block}/mlp/down/kernel": lead + ("mlp", "embed"),
    }
    if family == "llama":
        expected.update({"lm_head/kernel": ("embed", "vocab"), f"{block}/mlp/gate/kernel": lead + ("embed", "mlp")})
    else:
        expected.update({
            "pos_embed/embedding": ("position", "embed"),
            "final_norm/bias": ("norm",),
            f"{block}/attn/q/bias": lead + ("heads", "head_dim"),
            f"{block}/attn/k/bias": lead + ("kv_heads", "head_dim"),
            f"{block}/attn/o/bias": lead + ("embed",),
            f"{block}/mlp/up/bias": lead + ("mlp",),
            f"{block}/mlp/down/bias": lead + ("embed",),
        })
        assert "lm_head/kernel" not in leaves and f"{block}/mlp/gate/kernel" not in leaves
    for path, names in expected.items():
        assert leaves[path].names == names, path
    specs = nn.get_partition_spec(boxed)
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


@pytest.mark.devices(4)
def test_logical_constraints_under_a_mesh():
    """With rules and a (data, fsdp, tensor) mesh active the activation constraints apply and change nothing."""
    cfg = tiny("llama")
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in DEFAULT_RULES)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = forward(cfg, params_of("llama"), *packed_batch(cfg))
        for scan in (False, True):  # init constrains every parameter to its logical sharding: all ranks must match
            jax.eval_shape(lambda scan=scan: init_params(dataclasses.replace(cfg, scan_layers=scan), jax.random.key(0)))
    np.testing.assert_allclose(sharded, reference_logits("llama"), atol=1e-5, rtol=1e-5)


def test_hf_parameter_shapes():
    cfg = ModelConfig(family="llama", vocab_size=250, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      d_ff=80)
    shapes = {path: leaf.value.shape for path, leaf in _names(jax.eval_shape(lambda: init_params(cfg,
                                                                                                 jax.random.key(0)))).items()}
    layer = {
        "attn_norm/scale": (48,), "mlp_norm/scale": (48,),
        "attn/q/kernel": (48, 4, 16), "attn/k/kernel": (48, 2, 16), "attn/v/kernel": (48, 2, 16),
        "attn/o/kernel": (4, 16, 48),
        "mlp/gate/kernel": (48, 80), "mlp/up/kernel": (48, 80), "mlp/down/kernel": (80, 48),
    }
    expected = {"embed/embedding": (250, 48), "final_norm/scale": (48,), "lm_head/kernel": (48, 250)}
    for i in range(2):
        expected.update({f"layers_{i}/{k}": v for k, v in layer.items()})
    assert shapes == expected
    assert count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))) == sum(
        int(np.prod(s)) for s in expected.values())

    gpt2 = ModelConfig(family="gpt2", vocab_size=250, d_model=48, n_layers=1, n_heads=4, d_ff=192, max_seq_len=64,
                       tie_embeddings=True)
    shapes = {p: leaf.value.shape for p, leaf in _names(jax.eval_shape(lambda: init_params(gpt2,
                                                                                          jax.random.key(0)))).items()}
    assert shapes["pos_embed/embedding"] == (64, 48)
    assert shapes["layers_0/attn/q/bias"] == (4, 12) and shapes["layers_0/attn/o/bias"] == (48,)
    assert shapes["layers_0/mlp/up/kernel"] == (48, 192) and shapes["layers_0/mlp/up/bias"] == (192,)


def test_init_follows_hf():
    """Normal(init_std) kernels; GPT-2 residual projections scaled by 1/sqrt(2 n_layers); zero biases, unit norms."""
    cfg = tiny("gpt2")
    layer = params_of("gpt2")["layers_0"]
    np.testing.assert_allclose(np.std(layer["mlp"]["up"]["kernel"]), cfg.init_std, rtol=0.1)
    np.testing.assert_allclose(np.std(layer["mlp"]["down"]["kernel"]), cfg.init_std / 2, rtol=0.1)
    np.testing.assert_allclose(np.std(layer["attn"]["o"]["kernel"]), cfg.init_std / 2, rtol=0.1)
    assert not np.any(layer["attn"]["q"]["bias"]) and np.all(layer["attn_norm"]["scale"] == 1)
    np.testing.assert_allclose(np.std(params_of("llama")["layers_0"]["mlp"]["down"]["kernel"]), cfg.init_std, rtol=0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute_returns_float32_logits(family):
    cfg, params = tiny(family), params_of(family)
    batch = packed_batch(cfg)
    expected = reference_logits(family)
    mixed = forward(dataclasses.replace(cfg, dtype="bfloat16"), params, *batch)
    assert mixed.dtype == jnp.float32
    np.testing.assert_allclose(mixed, expected, atol=0.05 * float(np.abs(expected).max()))

    bf16_cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(bf16_cfg, jax.random.key(0))))
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits = forward(bf16_cfg, bf16_params, *batch)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, atol=0.1 * float(np.abs(expected).max()))


def test_init_cache_layout():
    cfg = tiny("llama", scan_layers=True)
    full = init_cache(cfg, batch_size=3, max_len=10)
    cache = full["layers"]["attn"]
    assert cache["cached_key"].value.shape == (2, 3, 10, 2, 8)
    assert cache["cached_key"].names == ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")
    assert cache["cached_segment_ids"].value.shape == (2, 3, 10) and cache["cache_index"].shape == (2,)
    with pytest.raises(ValueError, match="positions"):
        Transformer(cfg).apply({"params": params_of("llama", True), "cache": full}, jnp.zeros((3, 1), jnp.int32),
                               decode=True, mutable=["cache"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k,m", [(16, 40), (40, 16)])  # bf16 on CPU copies x^T, then g^T (the smaller side)
def test_projection_gradients_equal_autodiffs(dtype, k, m):
    """dense, dense_t, add_bias and scale_last (own VJPs: a weight gradient from a padded copy of x^T or g^T in
    bf16 on CPU, bias and norm-weight gradients as dots with ones) give autodiff's gradients of the plain
    expressions."""
    from lmadapt.layers import add_bias, dense, dense_t, scale_last

    rng = np.random.default_rng(0)
    x, w, b, s = (jnp.asarray(rng.normal(size=sh), jnp.float32) for sh in ((24, k), (k, m), (m,), (k,)))
    cast = jnp.dtype(dtype)

    def ours(x, w, b, s):
        y = add_bias(dense(scale_last(x.astype(cast), s), w.astype(cast), jnp.float32), b)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(dense_t(x.astype(cast), w.T.astype(cast), jnp.float32)))

    def plain(x, w, b, s):
        up = lambda a: a.astype(cast).astype(jnp.float32)  # the same rounding of the inputs, then exact
        y = up(up(x) * up(s)) @ up(w) + b
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(up(x) @ up(w)))

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(x, w, b, s)
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2, 3)))(x, w, b, s)
    tol = 1e-5 if dtype == "float32" else 0.03  # bf16: the output gradient is rounded to bf16 before its dots
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, atol=tol * float(jnp.abs(e).max()))
