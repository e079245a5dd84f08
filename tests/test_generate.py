"""KV-cached generation against the full forward pass, sampling filters, eos handling."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmadapt.config import ModelConfig
from lmadapt.generate import generate, sample_logits
from lmadapt.model import Transformer, init_cache, init_params, stack_layers


def tiny(family: str, scan: bool = False) -> ModelConfig:
    extra = dict(n_kv_heads=2) if family == "llama" else dict(tie_embeddings=True)
    return ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                       init_std=0.1, scan_layers=scan, **extra)


@functools.cache
def params_of(family: str, scan: bool = False):
    """Plain params, initialised once per family ("rbg" keys: threefry inits compile slowly on CPU)."""
    params = jax.jit(lambda key: nn.unbox(init_params(tiny(family), key)))(jax.random.key(0, impl="rbg"))
    return stack_layers(params) if scan else params


def full_logits(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    return jax.jit(Transformer(cfg).apply)({"params": params}, tokens, positions, segment_ids)


PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_cached_decoding_matches_full_forward(family, scan):
    cfg, params = tiny(family, scan), params_of(family, scan)
    out = generate(Transformer(cfg), params, PROMPT, 8, rng=jax.random.key(0))
    assert out.shape == (2, 13) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], PROMPT)
    # Greedy re-running of the full forward pass picks, at step t, argmax of the last logits of out[:, :t]. The
    # model is causal, so those are the logits at position t - 1 of one pass over the whole sequence.
    logits = full_logits(cfg, params, out[:, :-1])
    np.testing.assert_array_equal(out[:, 5:], jnp.argmax(logits[:, 4:], axis=-1))


@pytest.mark.parametrize(("family", "scan"), [("llama", True), ("gpt2", False)])
def test_decode_logits_match_full_forward(family, scan):
    """Prefill then single-token steps reproduce the full pass's logits, with a left-padded row (segment 0)."""
    cfg, params = tiny(family, scan), params_of(family, scan)
    model = Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)), jnp.int32)
    segment_ids = jnp.array([[0, 0] + [1] * 7, [1] * 9])
    positions = jnp.array([[0, 0, *range(7)], list(range(9))])
    expected = full_logits(cfg, params, tokens, positions, segment_ids)

    apply = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    cache = nn.unbox(init_cache(cfg, batch_size=2, max_len=12))
    logits, variables = apply({"params": params, "cache": cache}, tokens[:, :6], positions[:, :6], segment_ids[:, :6])
    np.testing.assert_allclose(logits, expected[:, :6], atol=1e-5, rtol=1e-5)
    for t in range(6, 9):
        step = slice(t, t + 1)
        logits, variables = apply({"params": params, "cache": variables["cache"]}, tokens[:, step],
                                  positions[:, step], segment_ids[:, step])
        np.testing.assert_allclose(logits[:, 0], expected[:, t], atol=1e-5, rtol=1e-5)
    indices = _cache_indices(variables["cache"])
    assert indices and all((np.asarray(i) == 9).all() for i in indices)


def _cache_indices(cache):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache) if path[-1].key == "cache_index"]


def test_eos_ends_rows():
    cfg, params = tiny("llama"), params_of("llama")
    model = Transformer(cfg)
    free = np.asarray(generate(model, params, PROMPT, 8, rng=jax.random.key(0)))
    eos = int(free[1, 5])  # row 1's first new token; left alone, row 1 goes on to emit other tokens
    out = np.asarray(generate(model, params, PROMPT, 8, rng=jax.random.key(0), eos_id=eos))
    assert (out != free).any()
    for row in range(2):
        hits = np.flatnonzero(free[row, 5:] == eos)
        stop = 5 + hits[0] + 1 if hits.size else out.shape[1]
        np.testing.assert_array_equal(out[row, :stop], free[row, :stop])  # identical up to and including eos
        assert (out[row, stop:] == eos).all()  # then only eos
    # Once every row has ended the loop stops early; the remaining slots read eos.
    both = jnp.concatenate([PROMPT[1:], PROMPT[1:]])
    out = generate(model, params, both, 8, rng=jax.random.key(0), eos_id=eos)
    np.testing.assert_array_equal(out[:, 5:], np.full((2, 8), eos))


def test_generate_edges():
    cfg, params = tiny("gpt2"), params_of("gpt2")
    np.testing.assert_array_equal(generate(Transformer(cfg), params, PROMPT, 0, rng=jax.random.key(0)), PROMPT)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(Transformer(cfg), params, PROMPT, cfg.max_seq_len, rng=jax.random.key(0))


def _draws(logits, n, **kwargs):
    """n samples for one row of logits (the row repeated n times: one call, independent per-row draws)."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(sample_logits(batch, jax.random.key(0), **kwargs))


def test_sample_greedy_and_top_k_1():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(16, 50)), jnp.float32)
    greedy = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0)), greedy)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), 0.0, top_k=5, top_p=0.5), greedy)
    for seed in range(3):
        np.testing.assert_array_equal(sample_logits(logits, jax.random.key(seed), 1.0, top_k=1), greedy)


def test_sample_top_p_keeps_minimal_nucleus():
    # Token probabilities, deliberately not sorted by id: ids 3 (0.5) and 0 (0.3) form the 0.75-nucleus.
    probs = np.array([0.3, 0.05, 0.1, 0.5, 0.05])
    logits = np.log(probs)
    draws = _draws(logits, 4000, temperature=1.0, top_p=0.75)
    assert set(np.unique(draws)) == {0, 3}
    np.testing.assert_allclose(np.mean(draws == 3), 0.5 / 0.8, atol=0.03)  # renormalised within the nucleus
    # A nucleus that reaches top_p exactly stops there; top_p=1 keeps everything.
    assert set(np.unique(_draws(logits, 2000, temperature=1.0, top_p=0.5))) == {3}
    assert set(np.unique(_draws(logits, 4000, temperature=1.0, top_p=1.0))) == {0, 1, 2, 3, 4}
    # top_k first, then top_p on the renormalised rest (HF's order): top-3 = {3, 0, 2} with probabilities
    # 0.5/0.9, 0.3/0.9, 0.1/0.9, so {3, 0} holds 0.89 of the mass: enough for 0.85, not for 0.9.
    assert set(np.unique(_draws(logits, 4000, temperature=1.0, top_k=3, top_p=0.85))) == {0, 3}
    assert set(np.unique(_draws(logits, 4000, temperature=1.0, top_k=3, top_p=0.9))) == {0, 2, 3}


def test_sample_temperature_matches_softmax():
    logits = np.array([1.0, 0.0, -1.0, 0.5])
    for temperature in (0.5, 2.0):
        draws = _draws(logits, 20000, temperature=temperature)
        freqs = np.bincount(draws, minlength=4) / len(draws)
        np.testing.assert_allclose(freqs, jax.nn.softmax(logits / temperature), atol=0.015)


def test_generate_compiles_once_per_setting():
    from lmadapt.generate import _compiled

    cfg = tiny("gpt2")
    before = _compiled.cache_info()
    for seed in range(2):
        generate(Transformer(dataclasses.replace(cfg)), params_of("gpt2"), PROMPT, 3, rng=jax.random.key(seed),
                 temperature=0.7, top_k=10)
    after = _compiled.cache_info()
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1
