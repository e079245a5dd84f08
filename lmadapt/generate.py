"""Autoregressive sampling with a KV cache: one prefill pass over the prompt, then a jitted `lax.while_loop` that
feeds one token at a time (no Python loop per token).

    tokens = generate(Transformer(cfg), params, prompt, 64, rng=jax.random.key(0), temperature=0.8, top_p=0.95)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lmadapt.config import ModelConfig
from lmadapt.model import Transformer, init_cache


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """One token per row from logits [B, V] -> int32 [B].

    temperature 0 is greedy (argmax; top_k/top_p ignored). Otherwise sample from softmax(logits / temperature)
    restricted, in Hugging Face's order, to the top_k most likely tokens and then to the nucleus: the smallest
    set of most likely tokens whose probability reaches top_p (tokens tied with the last one kept are kept too).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the minimal prefix reaching top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: Transformer, params: Any, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None) -> jax.Array:
    """Continue each prompt row by `max_new_tokens` tokens: int32 [B, P + max_new_tokens], the prompt included.

    params: plain (unboxed) arrays. prompt: int32 [B, P], every row a real prompt of the same length P (no padding).
    After a row emits `eos_id` it emits only `eos_id`; the loop stops early once every row has.
    Compiled once per (model config, max_new_tokens, sampling settings) and prompt shape.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"model.max_seq_len={model.config.max_seq_len}")
    if max_new_tokens == 0:
        return prompt
    fn = _compiled(type(model), model.config, max_new_tokens, temperature, top_k, top_p, eos_id)
    return fn(params, prompt, rng)


# Keyed on the (frozen, hashable) config itself: equal configs share one compiled loop.
@functools.lru_cache(maxsize=32)
def _compiled(model_cls: type[Transformer], config: ModelConfig, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, eos_id: int | None) -> Callable:
    model = model_cls(config)
    return jax.jit(functools.partial(_generate, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, eos_id=eos_id))


def _generate(params: Any, prompt: jax.Array, rng: jax.Array, *, model: Transformer, max_new_tokens: int,
              temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None) -> jax.Array:
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def forward(cache, tokens, start):
        positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, variables = model.apply({"params": params, "cache": cache}, tokens, positions=positions,
                                        decode=True, mutable=["cache"])
        return logits[:, -1], variables["cache"]

    # Prefill: the whole prompt in one pass writes its keys and values into the cache.
    cache = nn.unbox(init_cache(model.config, batch, total))
    last_logits, cache = forward(cache, prompt, 0)
    first = sample(last_logits, jax.random.fold_in(rng, prompt_len))
    done = first == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    fill = 0 if eos_id is None else eos_id  # slots never written (after an early stop) read as eos
    tokens = jnp.full((batch, total), fill, jnp.int32).at[:, :prompt_len].set(prompt).at[:, prompt_len].set(first)

    # Decode: feed token i (at position i), sample token i + 1.
    def cond(state):
        i, _, _, done = state
        return (i < total - 1) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, done = state
        logits, cache = forward(cache, lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), i)
        nxt = sample(logits, jax.random.fold_in(rng, i + 1))
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        tokens = lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i + 1, axis=1)
        return i + 1, tokens, cache, done

    _, tokens, _, _ = lax.while_loop(cond, body, (jnp.int32(prompt_len), tokens, cache, done))
    return tokens
