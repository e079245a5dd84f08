"""Rotary position embeddings with the scalings long-context checkpoints use, computed as transformers does.

    q = apply_rope(q, positions, cfg)       # q [B, T, heads, D], positions [B, T]

Frequencies follow `transformers.modeling_rope_utils` exactly (same float32 arithmetic and the same defaults),
so an imported Llama 3.x or YaRN checkpoint rotates its queries and keys as it did when it was trained.
Static types (default, linear, llama3, yarn) fix the frequencies at trace time; `dynamic` (NTK) grows the base
with the longest position in the call, as transformers' `dynamic_rope_update` does for one forward pass.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import ModelConfig, RopeScalingConfig


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: RopeScalingConfig, original: int) -> np.ndarray:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, s: RopeScalingConfig, original: int) -> tuple[np.ndarray, float]:
    """YaRN (NTK-by-parts): interpolate low frequencies, extrapolate high ones, scale attention."""

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp  # the share of each dimension that extrapolates
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention_factor)


def static_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [D/2] float32, attention factor on cos/sin) of a config's RoPE at trace time.

    For `dynamic` these are the unscaled frequencies (what a call within the original length uses).
    """
    s, dim, theta = cfg.rope_scaling, cfg.dim_per_head, cfg.rope_theta
    original = s.original_max_len or cfg.max_seq_len
    inv_freq = _default_inv_freq(theta, dim)
    if s.type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32), 1.0
    if s.type == "llama3":
        return _llama3(inv_freq, s, original), 1.0
    if s.type == "yarn":
        return _yarn(theta, dim, s, original)
    return inv_freq, 1.0


def _dynamic_inv_freq(cfg: ModelConfig, positions: jax.Array) -> jax.Array:
    """NTK-aware base growth for the longest position of this call (no change within max_seq_len)."""
    dim, factor, max_len = cfg.dim_per_head, cfg.rope_scaling.factor, cfg.max_seq_len
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_len)
    base = cfg.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / base ** exponents


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate x [B, T, heads, D] at integer positions [B, T]: transformers' non-interleaved convention
    (dimension i pairs with i + D/2, `rotate_half`), computed in float32 and returned in x's dtype."""
    inv_freq, attention_factor = static_frequencies(cfg)
    freqs = _dynamic_inv_freq(cfg, positions) if cfg.rope_scaling.type == "dynamic" else jnp.asarray(inv_freq)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D], shared by all heads
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
