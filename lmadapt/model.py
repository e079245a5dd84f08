"""A decoder-only transformer in Flax linen for every family of lmadapt/families.py (Llama 3.x, Mistral, Qwen2,
Qwen3, Gemma 2, GPT-2): one block whose parts are chosen by data (norm kind, MLP kind, biases, q/k norms, sandwich
norms, sliding windows, softcaps, RoPE scaling), each parameterised exactly as the family's transformers class so
weights convert both ways by renaming and reshaping alone.

    model = Transformer(cfg)
    params = model.init(rng, tokens)["params"]           # boxed: every leaf an nn.Partitioned with logical names
    logits = forward(params, model, batch)               # the full forward pass of a batch (lmadapt.data.batch)

ModelConfig is frozen and hashable, so a Transformer built from one is too, and equal configs give equal modules:
jitted functions take either as a static argument and share compiled code across calls.

Every parameter and main activation carries logical axis names ("embed", "heads", "batch", ...); the mapping to
mesh axes is data (`config.mesh.rules`), applied by `lmadapt.sharding`. Outside a mesh the names are no-ops.

Packed rows: token i attends to token j only if j <= i and both share a segment id (0 marks padding), and positions
restart per document, so a packed row gives each document exactly the logits it would get alone.

Decoding uses the linen KV-cache idiom: `decode=True` with a "cache" collection passed and returned via
`mutable=["cache"]` (see `init_cache` and `lmadapt.generate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lmadapt.config import ModelConfig
from lmadapt.data.batch import Batch
from lmadapt.families import family
from lmadapt.layers import Projection, attention, dense_t, normal_init, scale_last
from lmadapt.precision import compute_dtype
from lmadapt.rope import apply_rope

# Logical names of the main activations ([batch, length, ...]); mapped to mesh axes by the config's rules.
RESIDUAL = ("batch", "activation_length", "activation_embed")
QUERY = ("batch", "activation_length", "activation_heads", None)
KEY_VALUE = ("batch", "activation_length", "activation_kv_heads", None)
MLP_HIDDEN = ("batch", "activation_length", "activation_mlp")
LOGITS = ("batch", "activation_length", "activation_vocab")
CACHE = ("cache_batch", "cache_length", "kv_heads", "head_dim")
# Under scan_layers every parameter (and cache entry) gains a leading axis with this logical name.
_LAYER_AXIS = {nn.PARTITION_NAME: "layers"}

# Which intermediates a rematerialised block keeps for the backward pass (None: only its inputs).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output, attention scores included
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # weight matmuls only
}


def _proj(cfg: ModelConfig, n_in: int, shape: tuple[int, ...], names: tuple[str, ...],
          bias_names: tuple[str, ...], *, name: str, bias: bool, std: float | None = None) -> Projection:
    """A projection of the model, with a bias when `bias`; init std from the config unless given."""
    return Projection(shape, n_in, names, bias_names if bias else None, cfg.init_std if std is None else std,
                      jnp.dtype(compute_dtype(cfg.dtype)), jnp.dtype(cfg.param_dtype), name=name)


def _residual_std(cfg: ModelConfig) -> float:
    # GPT-2 scales the init of projections that write into the residual stream (attn o, mlp down) by
    # 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth; the others do not.
    return cfg.init_std / math.sqrt(2 * cfg.n_layers) if family(cfg.family).scaled_residual_init else cfg.init_std


class Norm(nn.Module):
    """The family's norm over the last axis (size `dim`, default d_model), statistics in float32 as transformers
    computes them: RMSNorm (weight times the normalised input cast back), Gemma's RMSNorm (x * (1 + w), all in
    float32, the weight initialised at 0) or LayerNorm with a bias (GPT-2)."""

    config: ModelConfig
    dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kind = family(cfg.family).norm
        dtype, param_dtype = jnp.dtype(compute_dtype(cfg.dtype)), jnp.dtype(cfg.param_dtype)
        dim = self.dim or cfg.d_model
        init = nn.initializers.zeros_init() if kind == "rms_offset" else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (dim,), param_dtype)
        x32 = x.astype(jnp.float32)
        if kind != "layer":
            y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
            if kind == "rms_offset":  # Gemma2RMSNorm: the multiply stays in float32
                return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype)
            return scale_last(y.astype(dtype), scale)  # LlamaRMSNorm: cast back, then the weight
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))
        bias = self.param("bias", zeros, (dim,), param_dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + cfg.norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, the family's biases, q/k norms and RoPE, an optional
    sliding window (`window`: None or an int, traced under scan_layers) and an optional KV cache."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 window: jax.Array | int | None = None) -> jax.Array:
        cfg, fam = self.config, family(self.config.family)
        heads, kv_heads, head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        d = cfg.d_model
        q = _proj(cfg, 1, (d, heads, head_dim), ("embed", "heads", "head_dim"), ("heads", "head_dim"),
                  name="q", bias=fam.qkv_bias)(x)
        kv_names, kv_bias_names = ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim")
        k = _proj(cfg, 1, (d, kv_heads, head_dim), kv_names, kv_bias_names, name="k", bias=fam.qkv_bias)(x)
        v = _proj(cfg, 1, (d, kv_heads, head_dim), kv_names, kv_bias_names, name="v", bias=fam.qkv_bias)(x)
        if fam.qk_norm:  # Qwen3: RMSNorm over head_dim of every head, before RoPE
            q, k = Norm(cfg, head_dim, name="q_norm")(q), Norm(cfg, head_dim, name="k_norm")(k)
        if fam.rope:
            q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
        q = nn.with_logical_constraint(q, QUERY)
        k = nn.with_logical_constraint(k, KEY_VALUE)
        v = nn.with_logical_constraint(v, KEY_VALUE)

        q_index = jnp.arange(x.shape[1])  # key slot of each query: its index in the row, or in the cache
        kv_segment_ids = segment_ids
        if self.decode:
            k, v, kv_segment_ids, start = self._update_cache(k, v, segment_ids)
            q_index = q_index + start

        out = attention(q, k, v, q_index, segment_ids, kv_segment_ids, cfg, window, decode=self.decode)
        out = nn.with_logical_constraint(out, QUERY)
        return _proj(cfg, 2, (heads, head_dim, d), ("heads", "head_dim", "embed"), ("embed",),
                     std=_residual_std(cfg), name="o", bias=fam.out_bias)(out)

    def _update_cache(self, k: jax.Array, v: jax.Array,
                      segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | int]:
        """Write this call's keys, values and segment ids at `cache_index`; return the whole cache and the start.

        The first call (inside `init`) only creates the cache, sized by its input [B, max_len], and attends
        within that input.
        """
        initialized = self.has_variable("cache", "cached_key")
        zeros = nn.with_logical_partitioning(jnp.zeros, CACHE)
        cached_key = self.variable("cache", "cached_key", zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", zeros, v.shape, v.dtype)
        # Caching segment ids keeps decoding under the same mask rule as training (padded or packed prompts work);
        # never-written slots hold segment 0 and are also excluded by causality.
        cached_segments = self.variable("cache", "cached_segment_ids",
                                        nn.with_logical_partitioning(jnp.zeros, CACHE[:2]), segment_ids.shape,
                                        jnp.int32)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return k, v, segment_ids, 0
        start = cache_index.value
        cached_key.value = lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
        cached_value.value = lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
        cached_segments.value = lax.dynamic_update_slice(cached_segments.value, segment_ids.astype(jnp.int32),
                                                         (0, start))
        cache_index.value = start + k.shape[1]
        return cached_key.value, cached_value.value, cached_segments.value, start


class Mlp(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); geglu (Gemma): down(gelu_tanh(gate(x)) * up(x));
    gelu (GPT-2): down(gelu_tanh(up(x))), with biases where the family has them."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, fam = self.config, family(self.config.family)
        shape_in, shape_out = (cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)
        up = _proj(cfg, 1, shape_in, ("embed", "mlp"), ("mlp",), name="up", bias=fam.out_bias)(x)
        if fam.mlp == "gelu":
            hidden = jax.nn.gelu(up, approximate=True)  # HF "gelu_new"
        else:
            gate = _proj(cfg, 1, shape_in, ("embed", "mlp"), ("mlp",), name="gate", bias=fam.out_bias)(x)
            # HF "gelu_pytorch_tanh" is the tanh approximation, like "gelu_new".
            hidden = (nn.silu(gate) if fam.mlp == "swiglu" else jax.nn.gelu(gate, approximate=True)) * up
        hidden = nn.with_logical_constraint(hidden, MLP_HIDDEN)
        return _proj(cfg, 1, shape_out, ("mlp", "embed"), ("embed",), std=_residual_std(cfg),
                     name="down", bias=fam.out_bias)(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)); with the family's sandwich norms
    (Gemma 2) each branch is normalised again before it is added."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 window: jax.Array | int | None = None) -> tuple[jax.Array, None]:
        cfg, post = self.config, family(self.config.family).post_norms
        h = Attention(cfg, self.decode, name="attn")(Norm(cfg, name="attn_norm")(x), positions, segment_ids, window)
        x = x + (Norm(cfg, name="post_attn_norm")(h) if post else h)
        x = nn.with_logical_constraint(x, RESIDUAL)
        h = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        x = x + (Norm(cfg, name="post_mlp_norm")(h) if post else h)
        x = nn.with_logical_constraint(x, RESIDUAL)
        return x, None  # (carry, per-layer output): the signature nn.scan expects


def _windows(cfg: ModelConfig) -> list[int] | None:
    """Each layer's sliding window, a full layer's as a window longer than any row (None: no layer has one)."""
    if cfg.sliding_window is None:
        return None
    return [cfg.layer_window(i) or cfg.max_seq_len + 1 for i in range(cfg.n_layers)]


class Transformer(nn.Module):
    """The language model: tokens [B, T] int -> float32 logits [B, T, vocab].

    Params from `Transformer(cfg).init(rng, tokens)["params"]` are boxed `nn.Partitioned` leaves (use
    `nn.get_partition_spec` / `nn.unbox`); `apply` accepts boxed or plain arrays.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 decode: bool = False) -> jax.Array:
        """Logits for every position.

        positions: [B, T] int, None = arange(T) (required when decoding: the offset into the cache).
        segment_ids: [B, T] int, None = one document per row; 0 marks padding.
        decode: read and append to the "cache" collection (pass it with `mutable=["cache"]`).
        """
        cfg = self.config
        dtype, param_dtype = jnp.dtype(compute_dtype(cfg.dtype)), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if positions is None:
            if decode:
                raise ValueError("decode=True needs explicit positions (the cache offset of each token)")
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        fam = family(cfg.family)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=normal_init(cfg.init_std, ("vocab", "embed")),
                         dtype=dtype, param_dtype=param_dtype, name="embed")
        x = embed(tokens)
        if fam.embed_scale:  # Gemma: the normaliser is rounded to the compute dtype first, as in transformers
            x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
        if not fam.rope:
            init = normal_init(cfg.init_std, ("position", "embed"))
            x = x + nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=init, dtype=dtype, param_dtype=param_dtype,
                             name="pos_embed")(positions)
        x = nn.with_logical_constraint(x, RESIDUAL)

        block = Block
        if cfg.remat != "none":
            # Under scan the loop boundary already stops XLA from merging recomputation with the forward pass.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        windows = _windows(cfg)
        if cfg.scan_layers:
            # One block traced once, its params and cache stacked on a leading "layers" axis: compile time
            # independent of depth. Per-layer windows (Gemma 2 alternates) enter as a scanned input.
            block = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0 if windows else nn.broadcast),
                            length=cfg.n_layers, metadata_params=_LAYER_AXIS)
            layer_windows = jnp.asarray(windows, jnp.int32) if windows else None
            x, _ = block(cfg, decode, name="layers")(x, positions, segment_ids, layer_windows)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, decode, name=f"layers_{i}")(x, positions, segment_ids,
                                                                windows[i] if windows else None)
        x = Norm(cfg, name="final_norm")(x)

        # Logits accumulate and come out in float32 from compute-dtype inputs: exact enough for the loss,
        # and no float32 copy of the [d, vocab] matrix.
        if cfg.tie_embeddings:
            # Through `dense_t`, whose three dots XLA's CPU backend runs on the BF16 units (an einsum's weight
            # gradient, and `x @ embedding.T`, it upcasts to float32); the same dots otherwise.
            b, t, d = x.shape
            logits = dense_t(x.reshape(b * t, d).astype(dtype), embed.embedding.astype(dtype),
                             jnp.float32).reshape(b, t, -1)
        else:
            logits = Projection((cfg.d_model, cfg.vocab_size), 1, ("embed", "vocab"), None, cfg.init_std, dtype,
                                param_dtype, out_dtype=jnp.float32, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_softcap is not None:  # Gemma 2
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return nn.with_logical_constraint(logits, LOGITS)


def forward(params: Any, model: nn.Module, batch: Batch) -> jax.Array:
    """Float32 logits [B, T, vocab] of a batch's `tokens` under its `positions` and `segment_ids` (packed rows).

    The one full forward pass (no KV cache) that training, evaluation and the Fisher estimate share; decoding
    goes through `apply(..., decode=True)` instead (lmadapt.generate). `params`: boxed or plain arrays.
    """
    return model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"])


def per_layer(config: ModelConfig) -> ModelConfig:
    """`config` in the per-layer params layout (layers_0, layers_1, ...; no scan): the one import, export and
    evaluation use whatever layout a run trained in (`Lineage.load_params(scan_layers=False)` gives it)."""
    return dataclasses.replace(config, scan_layers=False)


# --------------------------------------------------------------------------------------------------
# Helpers on parameter trees
# --------------------------------------------------------------------------------------------------


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Fresh boxed params (`nn.Partitioned` leaves). Wrap in `jax.eval_shape` for shapes and names alone."""
    return Transformer(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> dict[str, Any]:
    """A zeroed KV cache for rows of up to `max_len` tokens, boxed like params; pass as {"cache": ...}.

    Per attention layer: cached_key, cached_value [B, max_len, kv_heads, head_dim] (compute dtype),
    cached_segment_ids [B, max_len] int32, cache_index int32 scalar; stacked on a leading axis under scan_layers.
    """
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    model = Transformer(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions=tokens, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(params: Any) -> int:
    """Number of parameters in a tree (boxed or plain)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Per-layer params {layers_0: .., layers_1: .., ...} -> {layers: ..} stacked on axis 0 (the scan_layers layout).

    Works on plain arrays and on boxed `nn.Partitioned` leaves (which gain the "layers" axis name).
    """
    params = dict(params)
    n = sum(1 for key in params if key.startswith("layers_"))
    blocks = [params.pop(f"layers_{i}") for i in range(n)]

    def stack(*leaves):
        if isinstance(leaves[0], nn.Partitioned):
            value = jnp.stack([leaf.value for leaf in leaves])
            return leaves[0].replace_boxed(value).add_axis(0, _LAYER_AXIS)
        return jnp.stack(leaves)

    params["layers"] = jax.tree.map(stack, *blocks, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return params


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layers`: {layers: stacked} -> {layers_0: .., layers_1: .., ...}."""
    params = dict(params)
    stacked = params.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]

    def take(i, leaf):
        if isinstance(leaf, nn.Partitioned):
            return leaf.replace_boxed(leaf.value[i]).remove_axis(0, _LAYER_AXIS)
        return leaf[i]

    for i in range(n):
        params[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: take(i, leaf), stacked,
                                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return params
