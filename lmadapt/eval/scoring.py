"""Evaluating model versions on datasets: language-model scores, classification by ranking label
continuations, and generation samples.

Language-model scores on a dataset's held-out split: loss (nats per token), perplexity, bits per byte
(the loss summed over tokens, in bits, divided by the UTF-8 bytes those tokens spell: comparable across
tokenizers) and next-token accuracy. Classification datasets score each held-out record by the
log-probability of every label continuation after its prompt and predict the best.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import DataConfig, ModelConfig, SourceConfig, TokenizerConfig
from lmadapt.data.batch import Batch
from lmadapt.data.pipeline import build_pipeline, held_out_split
from lmadapt.data.sources import read_source
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.model import Transformer, forward, per_layer


def dataset_key(src: SourceConfig, fingerprint: dict[str, Any], tokenizer: Tokenizer, val_fraction: float,
                seed: int) -> str:
    """A stable key for "this held-out split, scored this way" (stored with each version's metrics)."""
    blob = json.dumps({"source": fingerprint, "tokenizer": tokenizer.fingerprint, "val_fraction": val_fraction,
                       "seed": seed}, sort_keys=True)
    return f"{src.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of the original text each token id stands for (specials 0), so bits per byte needs no
    re-decoding: bytes for the byte tokenizer, "▁" as a space and "<0x0A>" as one byte for SentencePiece,
    the byte-to-unicode map for byte-level BPE tokenizer.json files."""
    return tokenizer.token_bytes()


# The model is a static argument: equal configs give equal (hashable) modules, so every version of one
# architecture shares the compiled scorer.
@functools.partial(jax.jit, static_argnames="model")
def _score(params: Any, batch: Batch, *, model: Transformer) -> tuple[jax.Array, ...]:
    """(summed target NLL, counted tokens, correct argmax predictions, per-row summed NLL [B]) of a batch."""
    logits = forward(params, model, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return -jnp.sum(target_logp * mask), jnp.sum(mask), jnp.sum(correct * mask), -jnp.sum(target_logp * mask, axis=-1)


def _score_fn(model_cfg: ModelConfig):
    return functools.partial(_score, model=Transformer(per_layer(model_cfg)))


def lm_scores(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, src: SourceConfig, *, seq_len: int,
              batch_size: int, max_batches: int, val_fraction: float = 0.05, seed: int = 0,
              cache_dir: str | None = None) -> dict[str, Any]:
    """Held-out scores of one dataset (its split is the one training used: same seed and fraction)."""
    data = DataConfig(sources=(src,), val_fraction=val_fraction, seed=seed, cache_dir=cache_dir or "~/.cache/lmadapt")
    pipe = build_pipeline(data, TokenizerConfig(), batch_size, seq_len, tokenizer=tokenizer)
    table = token_bytes(tokenizer)
    score = _score_fn(model_cfg)
    loss = count = correct = n_bytes = 0.0
    for i in range(pipe.val_batches(src.name, max_batches)):
        batch = pipe.val_batch(src.name, i)
        s, n, c, _ = score(params, {k: jnp.asarray(v) for k, v in batch.items()})
        loss, count, correct = loss + float(s), count + float(n), correct + float(c)
        n_bytes += float((table[batch["targets"]] * batch["loss_mask"]).sum())
    mean = loss / max(count, 1.0)
    fingerprint = pipe.sources[src.name]["fingerprint"]
    return {"dataset": src.name, "key": dataset_key(src, fingerprint, tokenizer, val_fraction, seed), "loss": mean,
            "perplexity": math.exp(min(mean, 50.0)), "bits_per_byte": loss / math.log(2) / max(n_bytes, 1.0),
            "token_accuracy": correct / max(count, 1.0), "tokens": int(count)}


def classify(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, src: SourceConfig, *,
             max_examples: int = 200, val_fraction: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Rank the label continuations of each held-out record by log-probability; predictions and truth."""
    _, val = held_out_split(read_source(src), val_fraction, seed, src.name)
    docs = val[:max_examples]
    labels = list(src.labels or [])
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    prompts = tokenizer.encode([d.prompt or "" for d in docs])
    conts = tokenizer.encode([" " + label for label in labels])
    rows = [(head + p, c) for p in prompts for c in conts]
    width = max(len(p) + len(c) for p, c in rows)
    width = min(model_cfg.max_seq_len, 1 << (width - 1).bit_length())  # few distinct shapes to compile
    score = _score_fn(model_cfg)
    totals = []
    for lo in range(0, len(rows), 64):
        chunk = rows[lo:lo + 64]
        batch = {k: np.zeros((64, width), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        batch["loss_mask"] = np.zeros((64, width), np.float32)
        for r, (p, c) in enumerate(chunk):
            seq = (p + c)[-(width + 1):]  # keep the end: the label must be scored
            n = len(seq) - 1
            batch["tokens"][r, :n], batch["targets"][r, :n] = seq[:-1], seq[1:]
            batch["positions"][r, :n], batch["segment_ids"][r, :n] = np.arange(n), 1
            batch["loss_mask"][r, n - len(c):n] = 1.0
        *_, per_row = score(params, {k: jnp.asarray(v) for k, v in batch.items()})
        totals.extend(np.asarray(per_row)[:len(chunk)].tolist())
    nll = np.asarray(totals).reshape(len(docs), len(labels))
    predicted = [labels[i] for i in np.argmin(nll, axis=1)]
    truth = [d.text.strip() for d in docs]
    return {"dataset": src.name, "labels": labels, "y_true": truth, "y_pred": predicted}
