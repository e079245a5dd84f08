"""Packing documents into fixed-length rows with segment ids and positions.

A document of n tokens gives n-1 (input, target) pairs. Documents longer than a row are cut into
pieces of at most `seq_len` pairs (or truncated, by policy); pieces are packed whole into rows
(next-fit), each piece its own segment with positions from 0, so the model's segment mask keeps them
apart and every input token of the split lands in exactly one row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lmadapt.data.batch import Batch
from lmadapt.data.shards import ShardedArray, range_sums


@dataclasses.dataclass
class PackStats:
    documents: int = 0
    pieces: int = 0
    split_documents: int = 0  # long documents cut into several pieces (long_docs: split)
    truncated_tokens: int = 0  # tokens dropped from long documents (long_docs: truncate)
    input_tokens: int = 0


@dataclasses.dataclass
class PackedRows:
    """Rows of one split of one source. Row r holds pieces `order[row_offsets[r]:row_offsets[r + 1]]`."""

    tokens: np.ndarray | ShardedArray
    weights: np.ndarray | ShardedArray | None
    piece_start: np.ndarray  # int64: first input token of each piece in `tokens`
    piece_len: np.ndarray  # int64: number of (input, target) pairs
    row_offsets: np.ndarray  # int64 [n_rows + 1] into the pieces (already in packing order)
    seq_len: int
    pad_id: int
    stats: PackStats
    loss_tokens: np.ndarray | None = None  # per row, as row_loss_tokens() (a plan stores it)
    loss_total: int | None = None

    @property
    def n_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row_pieces(self, r: int) -> list[tuple[int, int]]:
        """(start, pairs) of each piece in row r."""
        lo, hi = self.row_offsets[r], self.row_offsets[r + 1]
        return list(zip(self.piece_start[lo:hi].tolist(), self.piece_len[lo:hi].tolist(), strict=True))

    def row_loss_tokens(self) -> np.ndarray:
        """Per row, the number of target tokens that carry loss (what "tokens trained" counts)."""
        if self.loss_tokens is not None:
            return self.loss_tokens
        if self.weights is None:
            per_piece = self.piece_len
        else:
            per_piece = range_sums(self.weights, self.piece_start + 1, self.piece_start + self.piece_len + 1)
        cum_rows = np.concatenate([[0], np.cumsum(per_piece, dtype=np.int64)])
        return cum_rows[self.row_offsets[1:]] - cum_rows[self.row_offsets[:-1]]

    def rows(self, indices: np.ndarray) -> Batch:
        """The rows `indices` as a batch; an index of -1 gives an empty (fully masked) row."""
        b, t = len(indices), self.seq_len
        out = {
            "tokens": np.full((b, t), self.pad_id, np.int32),
            "targets": np.full((b, t), self.pad_id, np.int32),
            "positions": np.zeros((b, t), np.int32),
            "segment_ids": np.zeros((b, t), np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
        }
        for i, r in enumerate(np.asarray(indices).tolist()):
            if r < 0:
                continue
            col = 0
            for seg, (start, n) in enumerate(self.row_pieces(r), start=1):
                span = slice(col, col + n)
                piece = self.tokens[start:start + n + 1]  # one slice: inputs and their targets
                out["tokens"][i, span] = piece[:-1]
                out["targets"][i, span] = piece[1:]
                out["positions"][i, span] = np.arange(n)
                out["segment_ids"][i, span] = seg
                out["loss_mask"][i, span] = 1.0 if self.weights is None else self.weights[start + 1:start + n + 1]
                col += n
        return out


def make_pieces(starts: np.ndarray, ends: np.ndarray, seq_len: int,
                long_docs: str) -> tuple[np.ndarray, np.ndarray, PackStats]:
    """Cut the documents tokens[starts[i]:ends[i]] (in that order) into pieces of at most `seq_len` pairs."""
    pairs = np.asarray(ends, np.int64) - starts - 1
    keep = pairs > 0  # a one-token document has nothing to predict
    starts, pairs = np.asarray(starts, np.int64)[keep], pairs[keep]
    stats = PackStats(documents=int(keep.sum()))
    if long_docs == "truncate":
        stats.truncated_tokens = int(np.maximum(pairs - seq_len, 0).sum())
        piece_start, piece_len = starts, np.minimum(pairs, seq_len)
    else:
        counts = -(-pairs // seq_len)
        stats.split_documents = int((counts > 1).sum())
        doc_of_piece = np.repeat(np.arange(len(starts)), counts)
        first_piece = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        k = np.arange(len(doc_of_piece)) - first_piece[doc_of_piece]  # piece number within its document
        piece_start = starts[doc_of_piece] + k * seq_len
        piece_len = np.minimum(pairs[doc_of_piece] - k * seq_len, seq_len)
    stats.pieces = len(piece_start)
    stats.input_tokens = int(piece_len.sum())
    return piece_start, piece_len, stats


def next_fit(piece_len: np.ndarray, seq_len: int) -> np.ndarray:
    """Row offsets packing pieces in order: a piece opens a new row when the current one cannot hold it."""
    offsets = [0]
    used = 0
    for lo in range(0, len(piece_len), 1 << 16):  # a list of a block at a time: not one of every piece
        for i, n in enumerate(piece_len[lo:lo + (1 << 16)].tolist(), start=lo):
            if used + n > seq_len:
                offsets.append(i)
                used = 0
            used += n
    if len(piece_len):
        offsets.append(len(piece_len))
    return np.asarray(offsets, np.int64)


def pack(tokens: np.ndarray | ShardedArray, weights: np.ndarray | ShardedArray | None, doc_starts: np.ndarray,
         doc_ids: np.ndarray, seq_len: int, pad_id: int, long_docs: str = "split",
         shuffle_seed: Any = None) -> PackedRows:
    """Pack documents `doc_ids` into rows; with `shuffle_seed`, pieces are shuffled once before packing."""
    doc_ids = np.asarray(doc_ids, np.int64)
    starts, ends = np.asarray(doc_starts[doc_ids], np.int64), np.asarray(doc_starts[doc_ids + 1], np.int64)
    piece_start, piece_len, stats = make_pieces(starts, ends, seq_len, long_docs)
    piece_start, piece_len, offsets = arrange(piece_start, piece_len, seq_len, shuffle_seed)
    return PackedRows(tokens, weights, piece_start, piece_len, offsets, seq_len, pad_id, stats)


def arrange(piece_start: np.ndarray, piece_len: np.ndarray, seq_len: int,
            shuffle_seed: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces in packing order and the row offsets into them; with `shuffle_seed`, shuffled first."""
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(piece_start))
        piece_start, piece_len = piece_start[order], piece_len[order]
    # Full pieces fill a row each; only the shorter ones share rows, so a full piece never lands
    # behind a short one and wastes the rest of its row.
    full = piece_len == seq_len
    n_full = int(full.sum())
    piece_start = np.concatenate([piece_start[full], piece_start[~full]])
    piece_len = np.concatenate([piece_len[full], piece_len[~full]])
    offsets = np.concatenate([np.arange(n_full, dtype=np.int64), n_full + next_fit(piece_len[n_full:], seq_len)])
    return piece_start, piece_len, offsets
