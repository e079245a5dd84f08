"""The pure train step: gradient accumulation is exact, the loss counts only masked-in tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.model import Transformer
from lmadapt.optim import make_optimizer, make_schedule
from lmadapt.train_step import init_state, token_loss_sums, train_step


def setup(tiny_config, *overrides):
    cfg = tiny_config(*overrides)
    model = Transformer(cfg.model)
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    state = init_state(jax.random.PRNGKey(0), model, tx, cfg.train.seq_len)
    return cfg, model, tx, schedule, state


def random_batch(rng, batch, seq, vocab):
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    mask = (rng.random((batch, seq)) > 0.3).astype(np.float32)  # uneven token counts per microbatch
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32)}


def test_microbatches_equal_one_big_batch(tiny_config):
    cfg, model, tx, schedule, state = setup(tiny_config)
    batch = random_batch(np.random.default_rng(0), 8, 32, cfg.model.vocab_size)
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule)
    one, m_one = jax.jit(functools.partial(step, microbatches=1))(state, batch)
    four, m_four = jax.jit(functools.partial(step, microbatches=4))(state, batch)
    np.testing.assert_allclose(m_four["loss"], m_one["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_four["grad_norm"], m_one["grad_norm"], rtol=1e-5)
    assert float(m_four["tokens"]) == float(batch["loss_mask"].sum())
    for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(four.step) == 1


def test_loss_is_mean_over_masked_tokens():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets = jnp.array([[0, 1, 1]])
    mask = jnp.array([[1.0, 0.0, 1.0]])
    total, count = token_loss_sums(logits, targets, mask)
    assert float(count) == 2.0
    np.testing.assert_allclose(float(total), -np.log(0.5) - np.log(0.8), rtol=1e-6)


def test_training_reduces_loss(tiny_config):
    cfg, model, tx, schedule, state = setup(tiny_config, "optimizer.lr=1e-2", "schedule.warmup_steps=0")
    batch = random_batch(np.random.default_rng(1), 4, 16, cfg.model.vocab_size)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_compute_trains_like_float32(tiny_config):
    """bf16 compute (float32 params, float32 accumulation, lmadapt's CPU-friendly dots) against float32 from the
    same state and batch, on both families: loss to 1%, gradient norm to 5%, and the params' first AdamW step (about
    lr each, its sign the gradient's) the same for all but a few of them (where a gradient near 0 flips sign)."""
    for family in ("gpt2", "llama"):
        fam = [f"model.family={family}"] + (["model.n_kv_heads=null", "model.tie_embeddings=true"]
                                            if family == "gpt2" else [])
        out = {}
        for dtype in ("float32", "bfloat16"):
            cfg, model, tx, schedule, state = setup(tiny_config, *fam, f"model.dtype={dtype}", "optimizer.lr=1e-3",
                                                    "schedule.warmup_steps=0")
            batch = random_batch(np.random.default_rng(2), 4, 32, cfg.model.vocab_size)
            new, metrics = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))(state, batch)
            out[dtype] = state.params, new.params, metrics
        before, f32, m32 = out["float32"]
        _, b16, m16 = out["bfloat16"]
        np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-2)
        np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)
        differ = total = 0
        for p0, a, b in zip(jax.tree.leaves(before), jax.tree.leaves(f32), jax.tree.leaves(b16), strict=True):
            assert b.dtype == jnp.float32  # master params stay float32
            differ += int((np.abs((b - p0) - (a - p0)) > 0.5e-3).sum())
            total += a.size
        assert differ / total < 0.03, f"{family}: {differ} of {total} params stepped differently in bf16"
