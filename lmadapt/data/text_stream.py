"""A byte-level reader of one local text file: the bundled default data until the tokenizer layer lands.

Every batch is a pure function of (seed, step): a resumed run, or a run on another number of
processes, sees exactly the rows an uninterrupted single-process run sees.
"""

from __future__ import annotations

import gzip
import lzma
import os

import numpy as np

Batch = dict[str, np.ndarray]  # tokens, targets, positions, segment_ids: int32 [B, T]; loss_mask: float32 [B, T]


class DataError(ValueError):
    """A data problem, naming the file and what is wrong."""


def read_text(path: str) -> str:
    """Read a plain, .gz or .xz UTF-8 text file (undecodable bytes are an error naming the file)."""
    if not os.path.isfile(path):
        raise DataError(f"data.path {path!r}: file not found")
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path {path!r}: not UTF-8 at byte {e.start}") from None


class TextStream:
    """Random windows of `seq_len + 1` bytes from a token stream, one batch per step."""

    vocab_size = 256

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, name: str = "stream"):
        if len(tokens) < seq_len + 2:
            raise DataError(f"{name}: {len(tokens)} tokens is fewer than one row of train.seq_len+1={seq_len + 1}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def batch(self, step: int, rows: slice | None = None) -> Batch:
        """Rows `rows` (default: all) of the global batch for `step`."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)[rows or slice(None)]
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]].astype(np.int32)
        shape = window[:, :-1].shape
        return {
            "tokens": window[:, :-1],
            "targets": window[:, 1:],
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
            "segment_ids": np.ones(shape, np.int32),
            "loss_mask": np.ones(shape, np.float32),
        }


def train_and_val(path: str, val_fraction: float, batch_size: int, seq_len: int, seed: int,
                  eval_batch_size: int | None = None) -> tuple[TextStream, TextStream]:
    """Split the file's bytes into a training stream and a held-out tail for validation."""
    data = np.frombuffer(read_text(path).encode("utf-8"), dtype=np.uint8)
    n_val = max(int(len(data) * val_fraction), seq_len + 2)
    if len(data) - n_val < seq_len + 2:
        raise DataError(f"data.path {path!r}: {len(data)} bytes is too small for train.seq_len={seq_len}")
    train = TextStream(data[:-n_val], batch_size, seq_len, seed, name=f"{path} (train)")
    val = TextStream(data[-n_val:], eval_batch_size or batch_size, seq_len, seed + 1_000_003, name=f"{path} (val)")
    return train, val
