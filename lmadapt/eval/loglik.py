"""Log-likelihoods of continuations given contexts, packed several to a row: the primitive of multiple-choice
scoring and of lm-evaluation-harness's `loglikelihood`.

    results = loglikelihoods(params, model_cfg, tokenizer, [("The sky is", " blue"), ("2 + 2 =", " 4")])
    results[0].logprob, results[0].greedy        # sum of log p(continuation tokens), all of them argmax?

Tokenization is the harness's: trailing whitespace of the context moves to the continuation, the pair is encoded
whole and split where the context's own encoding ends (a word boundary tokenizes as in running text), and the
tokenizer's BOS (when it has one) starts every context. A request longer than `width + 1` tokens keeps its end:
the context is cut on the left, as the harness does at the model's maximum length.

Packing: requests go first-fit, longest first, into rows of `ROW_TOKENS` tokens; segment ids keep them apart and
positions restart per request, so a packed request sees exactly the tokens it would see alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.data.batch import Batch
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.model import Transformer, forward, per_layer

ROWS = 16  # rows per forward pass: a few shapes to compile, whatever the number of requests
ROW_TOKENS = 128  # tokens per packed row (a longer request gets a row of its own length)


@dataclasses.dataclass(frozen=True)
class Result:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens scored


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids), split as lm-evaluation-harness splits a decoder-only pair."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    whole, ctx = tokenizer.encode([context + continuation, context])
    return head + ctx, whole[len(ctx):]


def _rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: request indices per row, each row's total length <= width."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def _pack(seqs: list[list[int]], conts: list[int], rows: list[list[int]], width: int
          ) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
    """The packed arrays of `rows` and, per request, (row, first, last + 1) of its continuation's targets."""
    batch = {k: np.zeros((len(rows), width), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((len(rows), width), np.float32)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(seqs)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            seq = seqs[i]
            n = len(seq) - 1
            batch["tokens"][r, at:at + n], batch["targets"][r, at:at + n] = seq[:-1], seq[1:]
            batch["positions"][r, at:at + n], batch["segment_ids"][r, at:at + n] = np.arange(n), segment
            batch["loss_mask"][r, at + n - conts[i]:at + n] = 1.0
            spans[i] = (r, at + n - conts[i], at + n)
            at += n
    return batch, spans


@functools.partial(jax.jit, static_argnames="model")
def _token_logprobs(params: Any, batch: Batch, *, model: Transformer) -> tuple[jax.Array, jax.Array]:
    """log p(target) and whether the target is the argmax, per position: float32 and bool [B, T]."""
    logits = forward(params, model, batch).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    target = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return target, jnp.argmax(logits, axis=-1) == batch["targets"]


def loglikelihoods(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer,
                   requests: Sequence[tuple[str, str]], *, width: int | None = None, pack: bool = True
                   ) -> list[Result]:
    """One `Result` per (context, continuation) request, in order. `width`: the longest request kept (default:
    the model's maximum length); `pack=False` scores one request per row (the reference packing must equal).
    Params are in the per-layer layout (`scan_layers=False`, as versions load)."""
    pairs = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        pairs.append((ctx, cont))
    return score_token_pairs(params, model_cfg, pairs, width=width, pack=pack)


def score_token_pairs(params: Any, model_cfg: ModelConfig, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, width: int | None = None, pack: bool = True) -> list[Result]:
    """`loglikelihoods` on token ids: one `Result` per (context ids, continuation ids) pair, in order."""
    width = width or model_cfg.max_seq_len
    seqs = [(list(ctx) + list(cont))[-(width + 1):] for ctx, cont in pairs]  # keep the end: the continuation
    conts = [min(len(cont), width) for _, cont in pairs]
    lengths = [len(s) - 1 for s in seqs]
    # Rows of ROW_TOKENS (or the longest request): on CPU a 16 x 256 pass costs about 6x a 16 x 128 one, so
    # filling wide rows loses more than the packing saves (measured with tools/bench_eval.py).
    capacity = min(width, max(ROW_TOKENS, max(lengths, default=1)))
    rows = _rows(lengths, capacity) if pack else [[i] for i in range(len(seqs))]
    model = Transformer(per_layer(model_cfg))
    out: list[Result | None] = [None] * len(seqs)
    for lo in range(0, len(rows), ROWS):
        chunk = rows[lo:lo + ROWS]
        used = max(sum(lengths[i] for i in row) for row in chunk)
        cols = min(capacity, 1 << max(used - 1, 0).bit_length())  # few distinct shapes to compile
        batch, spans = _pack(seqs, conts, chunk + [[]] * (ROWS - len(chunk)), cols)
        logp, greedy = jax.device_get(_token_logprobs(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                                      model=model))
        for row in chunk:
            for i in row:
                r, a, b = spans[i]
                out[i] = Result(float(np.sum(logp[r, a:b], dtype=np.float64)), bool(np.all(greedy[r, a:b])), b - a)
    return [r for r in out if r is not None]
