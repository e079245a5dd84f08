"""Building blocks of `lmadapt.model` that know no model family: the dense map with its own VJP, a projection with
logical axis names, and causal, segment-masked attention (sliding windows and soft-capping included).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lmadapt.config import ModelConfig


def normal_init(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
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
    return dx.astype(x.dtype), weight_grad(x, g).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_t(x: jax.Array, w_t: jax.Array, out_dtype: Any = None) -> jax.Array:
    """x [N, K] @ w_t [M, K]^T, as `dense` for a weight stored the other way round (a tied embedding [vocab, d]).

    Written as one dot_general contracting both last axes: `jnp.dot(x, w_t.T)` compiles to the same dot, but
    XLA's CPU backend then runs it in float32 from bf16 inputs (read from the compiled HLO on jax 0.12: a
    third of a small GPT-2's matmul work, the LM head, off the BF16 units)."""
    return lax.dot_general(x, w_t, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def _dense_t_fwd(x: jax.Array, w_t: jax.Array, out_dtype: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return dense_t(x, w_t, out_dtype), (x, w_t)


def _dense_t_bwd(out_dtype: Any, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w_t = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w_t, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), weight_grad(x, g).T.astype(w_t.dtype)


dense_t.defvjp(_dense_t_fwd, _dense_t_bwd)


def bf16_cpu_or(default: Callable[..., jax.Array], on_cpu: Callable[..., jax.Array], *args: jax.Array) -> jax.Array:
    """`on_cpu(*args)` where the first arg is bf16 and the program runs on CPU, `default(*args)` everywhere else: the
    CPU-only rewrites below reach XLA's BF16 units; float32 and other backends keep the plain form (unchanged HLO)."""
    if args[0].dtype != jnp.bfloat16:
        return default(*args)
    return lax.platform_dependent(*args, cpu=on_cpu, default=default)


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T g [K, M] in float32, for x [N, K], g [N, M].

    In bf16 on CPU, the smaller of x^T and g^T is first written out as a real row-major array, one zero row longer
    (sliced off after): XLA's CPU backend runs a bf16 dot on the BF16 units (YNNPACK) only when neither operand
    is transposed, and upcasts this one, whose operands both contract their leading axis, to a float32 dot. A
    plain transpose, or one behind `lax.optimization_barrier`, is folded back into the dot or still upcast (read
    from the compiled HLO on jax 0.12); a pad is not. Copying the smaller side: 321 vs 245 GFLOP/s for
    K=1536, M=384 (Llama's MLP down projection), +3% on its step, on an AMD EPYC with AVX512-BF16.
    """
    def plain(x: jax.Array, g: jax.Array) -> jax.Array:
        return jnp.dot(x.T, g, preferred_element_type=jnp.float32)

    def copied(x: jax.Array, g: jax.Array) -> jax.Array:
        if x.shape[1] > g.shape[1]:
            return copied(g, x).T  # (g^T x)^T
        xt = lax.pad(x.T, jnp.zeros((), x.dtype), ((0, 1, 0), (0, 0, 0)))
        return jnp.dot(xt, g, preferred_element_type=jnp.float32)[:-1]

    return bf16_cpu_or(plain, copied, x, g)


dense.defvjp(_dense_fwd, _dense_bwd)


def column_sum(g: jax.Array) -> jax.Array:
    """g [N, M] summed over N in float32. In bf16 on CPU a dot with a ones row, which XLA's CPU backend runs on
    the BF16 units; the plain sum is a strided reduction it tiles into reduce-windows (2-3 ms for a [2048, 384]
    gradient, 10x the dot). float32 keeps the sum: a ones dot was no gain or slower on a Zen 3 without them."""
    def on_cpu(g: jax.Array) -> jax.Array:
        return jnp.dot(jnp.ones((1, g.shape[0]), g.dtype), g, preferred_element_type=jnp.float32)[0]

    def elsewhere(g: jax.Array) -> jax.Array:
        return jnp.sum(g, axis=0, dtype=jnp.float32)

    return bf16_cpu_or(elsewhere, on_cpu, g)


@jax.custom_vjp
def scale_last(y: jax.Array, w: jax.Array) -> jax.Array:
    """y [..., M] * w [M] (a norm's weight), with the weight gradient a `column_sum` of g * y."""
    return y * w.astype(y.dtype)


def _scale_last_fwd(y: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return scale_last(y, w), (y, w)


def _scale_last_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    y, w = res
    g = g.astype(y.dtype)
    dw = column_sum((g * y).reshape(-1, y.shape[-1]))
    return g * w.astype(y.dtype), dw.astype(w.dtype)


scale_last.defvjp(_scale_last_fwd, _scale_last_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """y [N, M] + b [M], the bias gradient a `column_sum` (+14-25% on the bf16 step of a small GPT-2 on CPU,
    docs/performance.md)."""
    return y + b.astype(y.dtype)


def _add_bias_fwd(y: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    return add_bias(y, b), jnp.zeros((0,), b.dtype)


def _add_bias_bwd(res: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return g, column_sum(g).astype(res.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


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
        kernel = self.param("kernel", normal_init(self.std, self.names), self.shape, self.param_dtype)
        in_shape, out_shape = self.shape[:self.n_in], self.shape[self.n_in:]
        k, m = math.prod(in_shape), math.prod(out_shape)
        lead = x.shape[:x.ndim - self.n_in]
        y = dense(x.reshape(-1, k).astype(self.dtype), kernel.reshape(k, m).astype(self.dtype), self.out_dtype)
        if self.bias_names is not None:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.bias_names)
            bias = self.param("bias", zeros, out_shape, self.param_dtype).astype(self.dtype)
            y = add_bias(y, bias.reshape(m))
        return y.reshape(*lead, *out_shape)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     softcap: float | None = None) -> jax.Array:
    """Reference attention: softmax(cap(q k^T * scale), masked) v with scores and softmax in float32.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K (query head h reads kv head h // (H/K), as HF's
    `repeat_kv`); mask [B, 1, T, S] bool, True = may attend. `softcap` (Gemma 2) bounds the scores to
    (-cap, cap) with cap * tanh(scores / cap) before masking. A fully masked row gets a uniform (finite) softmax.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, cfg: ModelConfig, window: jax.Array | int | None = None, *,
              decode: bool = False) -> jax.Array:
    """Causal, segment-masked attention. q [B, T, H, D] sits at key slots q_index [T]; k, v [B, S, K, D].

    Query t may read key slot s iff s <= q_index[t], their segment ids match and, with a sliding `window`,
    q_index[t] - s < window (transformers' rule: a query sees the `window` newest keys, itself included).
    Within a document, slots and positions differ by a constant, so the window is the same in packed rows.
    """
    same_segment = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    slots = jnp.arange(k.shape[1])[None, :]
    in_window = None if window is None else (q_index[:, None] - slots < window)  # [T, S]
    scale = (cfg.query_pre_attn_scalar or cfg.dim_per_head) ** -0.5
    if cfg.attention == "cudnn" and not decode and cfg.attn_softcap is None:
        # cuDNN builds the causal mask itself (skipping fully masked tiles); jax turns the boolean mask into an
        # additive bias. cuDNN's causal mask is aligned to slot 0, which only the training layout
        # (q_index == arange(S)) satisfies, so decoding takes the XLA path below. Needs bf16/fp16 inputs.
        mask = same_segment if in_window is None else same_segment & in_window
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation="cudnn")
    mask = same_segment & (slots <= q_index[:, None])
    if in_window is not None:
        mask = mask & in_window
    if cfg.attention == "einsum" or cfg.attn_softcap is not None:  # jax's fused attention has no softcap
        return einsum_attention(q, k, v, mask, scale, cfg.attn_softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                         implementation=None if cfg.attention == "auto" else "xla")


