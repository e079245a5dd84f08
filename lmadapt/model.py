"""A decoder-only transformer in Flax linen: the Llama and GPT-2 families, parameterised exactly as Hugging Face's
`LlamaForCausalLM` and `GPT2LMHeadModel` so weights convert both ways by renaming and reshaping alone.

    model = Transformer(cfg)
    params = model.init(rng, tokens)["params"]           # boxed: every leaf an nn.Partitioned with logical names
    logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)

Every parameter and main activation carries logical axis names ("embed", "heads", "batch", ...); the mapping to
mesh axes is data (`config.mesh.rules`), applied by `lmadapt.sharding`. Outside a mesh the names are no-ops.

Packed rows: token i attends to token j only if j <= i and both share a segment id (0 marks padding), and positions
restart per document, so a packed row gives each document exactly the logits it would get alone.

Decoding uses the linen KV-cache idiom: `decode=True` with a "cache" collection passed and returned via
`mutable=["cache"]` (see `init_cache` and `lmadapt.generate`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lmadapt.config import ModelConfig

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


def _normal(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """x [N, K] @ w [K, M], accumulated in float32 and returned in `out_dtype` (None: x's dtype).

    Its own VJP so the weight gradient is `x^T g` read from the saved input: left to autodiff, XLA's CPU
    backend transposes the *output gradient* for that dot and fuses the whole residual-stream gradient
    chain into the transpose, recomputing it once per layer (a fifth of a GPT-2 step on CPU; see
    docs/performance.md). Same values as the plain einsum (the same three dots autodiff would emit); its
    effect on GPU/TPU speed is not measured yet.
    """
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def _dense_fwd(x: jax.Array, w: jax.Array, out_dtype: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype: Any, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    g = g.astype(x.dtype)
    dx = lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Projection(nn.Module):
    """A linear map over the trailing `n_in` axes of its input, with a kernel of exactly `shape` (input axes then
    output axes, each with its own logical name, so heads and head_dim shard separately) and, optionally, a
    bias over the output axes. Computed as one 2-D `dense` on flattened axes."""

    shape: tuple[int, ...]
    n_in: int
    names: tuple[str, ...]
    bias_names: tuple[str, ...] | None  # None: no bias
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_dtype: Any = None  # None: the compute dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _normal(self.std, self.names), self.shape, self.param_dtype)
        in_shape, out_shape = self.shape[:self.n_in], self.shape[self.n_in:]
        k, m = math.prod(in_shape), math.prod(out_shape)
        lead = x.shape[:x.ndim - self.n_in]
        y = dense(x.reshape(-1, k).astype(self.dtype), kernel.reshape(k, m).astype(self.dtype), self.out_dtype)
        y = y.reshape(*lead, *out_shape)
        if self.bias_names is not None:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.bias_names)
            y = y + self.param("bias", zeros, out_shape, self.param_dtype).astype(self.dtype)
        return y


def _proj(cfg: ModelConfig, n_in: int, shape: tuple[int, ...], names: tuple[str, ...],
          bias_names: tuple[str, ...], *, name: str, std: float | None = None) -> Projection:
    """A projection of the model: biases in GPT-2 only, init std from the config unless given."""
    return Projection(shape, n_in, names, bias_names if cfg.family == "gpt2" else None,
                      cfg.init_std if std is None else std, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                      name=name)


def _residual_std(cfg: ModelConfig) -> float:
    # GPT-2 scales the init of projections that write into the residual stream (attn o, mlp down) by
    # 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth; Llama does not.
    return cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.family == "gpt2" else cfg.init_std


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm with bias (gpt2), its statistics in float32 as Hugging Face computes them."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", ones, (cfg.d_model,), param_dtype)
        x32 = x.astype(jnp.float32)
        if cfg.family == "llama":
            # HF LlamaRMSNorm: normalise in float32, cast back, then multiply by the weight.
            y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
            return scale.astype(dtype) * y.astype(dtype)
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))
        bias = self.param("bias", zeros, (cfg.d_model,), param_dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + cfg.norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, heads, D] at integer positions [B, T], HF's non-interleaved convention:
    dimension i pairs with i + D/2 (`rotate_half`), frequency theta^(-2i/D). Computed in float32."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D], shared by all heads
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention: softmax(q k^T / sqrt(D), masked) v with scores and softmax in float32.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K (query head h reads kv head h // (H/K), as HF's
    `repeat_kv`); mask [B, 1, T, S] bool, True = may attend. A fully masked row gets a uniform (finite) softmax.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, implementation: str, *, decode: bool = False) -> jax.Array:
    """Causal, segment-masked attention. q [B, T, H, D] sits at key slots q_index [T]; k, v [B, S, K, D].

    Query t may read key slot s iff s <= q_index[t] and their segment ids match.
    """
    same_segment = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    if implementation == "cudnn" and not decode:
        # cuDNN builds the causal mask itself (skipping fully masked tiles); jax turns the boolean segment mask
        # into an additive bias. cuDNN's causal mask is aligned to slot 0, which only the training layout
        # (q_index == arange(S)) satisfies, so decoding takes the XLA path below. Needs bf16/fp16 inputs.
        return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True, implementation="cudnn")
    causal = jnp.arange(k.shape[1])[None, :] <= q_index[:, None]  # [T, S]
    mask = same_segment & causal
    if implementation == "einsum":
        return einsum_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         implementation=None if implementation == "auto" else "xla")


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads; RoPE for llama; an optional KV cache."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        cfg = self.config
        heads, kv_heads, head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        d = cfg.d_model
        q = _proj(cfg, 1, (d, heads, head_dim), ("embed", "heads", "head_dim"), ("heads", "head_dim"),
                  name="q")(x)
        kv_names, kv_bias_names = ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim")
        k = _proj(cfg, 1, (d, kv_heads, head_dim), kv_names, kv_bias_names, name="k")(x)
        v = _proj(cfg, 1, (d, kv_heads, head_dim), kv_names, kv_bias_names, name="v")(x)
        if cfg.family == "llama":
            q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, QUERY)
        k = nn.with_logical_constraint(k, KEY_VALUE)
        v = nn.with_logical_constraint(v, KEY_VALUE)

        q_index = jnp.arange(x.shape[1])  # key slot of each query: its index in the row, or in the cache
        kv_segment_ids = segment_ids
        if self.decode:
            k, v, kv_segment_ids, start = self._update_cache(k, v, segment_ids)
            q_index = q_index + start

        out = attention(q, k, v, q_index, segment_ids, kv_segment_ids, cfg.attention, decode=self.decode)
        out = nn.with_logical_constraint(out, QUERY)
        return _proj(cfg, 2, (heads, head_dim, d), ("heads", "head_dim", "embed"), ("embed",),
                     std=_residual_std(cfg), name="o")(out)

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
    """Llama: down(silu(gate(x)) * up(x)). GPT-2: down(gelu_tanh(up(x))) with biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        shape_in, shape_out = (cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)
        up = _proj(cfg, 1, shape_in, ("embed", "mlp"), ("mlp",), name="up")(x)
        if cfg.family == "llama":
            hidden = nn.silu(_proj(cfg, 1, shape_in, ("embed", "mlp"), ("mlp",), name="gate")(x)) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True)  # HF "gelu_new"
        hidden = nn.with_logical_constraint(hidden, MLP_HIDDEN)
        return _proj(cfg, 1, shape_out, ("mlp", "embed"), ("embed",), std=_residual_std(cfg),
                     name="down")(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        x = x + Attention(cfg, self.decode, name="attn")(Norm(cfg, name="attn_norm")(x), positions, segment_ids)
        x = nn.with_logical_constraint(x, RESIDUAL)
        x = x + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, RESIDUAL)
        return x, None  # (carry, per-layer output): the signature nn.scan expects


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
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if positions is None:
            if decode:
                raise ValueError("decode=True needs explicit positions (the cache offset of each token)")
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(cfg.init_std, ("vocab", "embed")),
                         dtype=dtype, param_dtype=param_dtype, name="embed")
        x = embed(tokens)
        if cfg.family == "gpt2":
            x = x + nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=_normal(cfg.init_std, ("position", "embed")),
                             dtype=dtype, param_dtype=param_dtype, name="pos_embed")(positions)
        x = nn.with_logical_constraint(x, RESIDUAL)

        block = Block
        if cfg.remat != "none":
            # Under scan the loop boundary already stops XLA from merging recomputation with the forward pass.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # One block traced once, its params and cache stacked on a leading "layers" axis: compile time
            # independent of depth.
            block = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                            metadata_params=_LAYER_AXIS)
            x, _ = block(cfg, decode, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, decode, name=f"layers_{i}")(x, positions, segment_ids)
        x = Norm(cfg, name="final_norm")(x)

        # Logits accumulate and come out in float32 from compute-dtype inputs: exact enough for the loss,
        # and no float32 copy of the [d, vocab] matrix.
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.embedding.astype(dtype), preferred_element_type=jnp.float32)
        else:
            logits = Projection((cfg.d_model, cfg.vocab_size), 1, ("embed", "vocab"), None, cfg.init_std, dtype,
                                param_dtype, out_dtype=jnp.float32, name="lm_head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), LOGITS)


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
