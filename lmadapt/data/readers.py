"""Reading a corpus in parts: with data.readers = R, each source's files are dealt to R readers and the global
batch is R blocks of batch_size / R rows, block g drawn only from reader g's files.

A process then reads only the files and token shards of the blocks its rows lie in (as MaxText and grain
shard files by host), and every batch is still a pure function of (seed, step, R): any number of processes
whose rows split the blocks sees the batches of one process with the same R. Each reader is a whole
`DataPipeline` over its files (the same weights, phases and accounting), so the guarantees hold per block:
a source's share is within one row in every block (within R rows of the global batch), every row of a
reader is drawn once per epoch, and the held-out documents are the source's own (a document's decision is a
hash of its file's content and its index there, `shuffle.HeldOut`), disjoint from all training rows. A source
with fewer files than readers is read whole by every reader, each drawing its rows in its own order.

Every process opens every reader's packing plan (memory-mapped: the held-out batch count and the tokens-seen
accounting must agree everywhere); token shards are opened when a batch first reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lmadapt.config import DataConfig
from lmadapt.data.batch import Batch
from lmadapt.data.mixture import Phase
from lmadapt.data.pipeline import DataPipeline, build_components, held_out
from lmadapt.data.shuffle import HeldOut
from lmadapt.data.sources import SourceRead, Unit
from lmadapt.data.token_cache import TokenizedSource, tokenize_source
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.data.written import Written


def deal(units: list[Unit], readers: int) -> list[list[int]] | None:
    """Unit indices of each reader, in source order: largest file first to the least-loaded reader (ties: the
    lowest); None when there are fewer files than readers (every reader reads the whole source)."""
    if len(units) < readers:
        return None
    load, groups = [0] * readers, [[] for _ in range(readers)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].size, i)):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += max(units[i].size, 1)
    return [sorted(g) for g in groups]


class ReaderPipeline:
    """R readers' pipelines as one: block g of every global batch (rows g*b .. (g+1)*b, b = batch_size / R) is
    reader g's batch. The interface of `DataPipeline`."""

    def __init__(self, readers: list[DataPipeline], replicated: set[str], described: dict[str, dict[str, Any]]):
        self.readers, self.replicated, self.sources = readers, replicated, described
        first = readers[0]
        self.tokenizer, self.seq_len, self.seed = first.tokenizer, first.seq_len, first.seed
        self.block = first.batch_size
        self.batch_size = self.block * len(readers)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def val(self) -> dict[str, list]:
        """Each source's held-out rows, per reader (the names are what a caller iterates)."""
        return {name: [r.val[name] for r in self.readers] for name in self.readers[0].val}

    @property
    def phases(self) -> list[Phase]:
        return self.readers[0].phases

    def set_phases(self, phases: list[Phase]) -> None:
        for r in self.readers:
            r.set_phases(phases)

    def with_phases(self, phases: list[Phase]) -> ReaderPipeline:
        return ReaderPipeline([r.with_phases(phases) for r in self.readers], self.replicated, self.sources)

    def _blocks(self, rows: slice | None) -> list[tuple[int, slice]]:
        """(reader, its rows) of the global rows `rows`, in order."""
        rows = rows or slice(0, self.batch_size)
        out = []
        for g in range(len(self.readers)):
            lo, hi = max(rows.start, g * self.block), min(rows.stop, (g + 1) * self.block)
            if lo < hi:
                out.append((g, slice(lo - g * self.block, hi - g * self.block)))
        return out

    @staticmethod
    def _join(parts: list[Batch]) -> Batch:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, step: int, rows: slice | None = None) -> Batch:
        """Rows `rows` (default: all) of the global training batch for `step`: only their readers are read."""
        return self._join([self.readers[g].batch(step, sub) for g, sub in self._blocks(rows)])

    def source_counts(self, step: int) -> dict[str, int]:
        counts = [r.source_counts(step) for r in self.readers]
        return {name: sum(c[name] for c in counts) for name in counts[0]}

    def tokens_seen(self, steps: int) -> dict[str, int]:
        seen = [r.tokens_seen(steps) for r in self.readers]
        return {name: sum(s[name] for s in seen) for name in seen[0]}

    def val_batches(self, name: str, limit: int) -> int:
        if name in self.replicated:  # one held-out set, the same in every reader: global batches of it
            return min(limit, -(-self.readers[0].val[name].n_rows // self.batch_size))
        return max(r.val_batches(name, limit) for r in self.readers)

    def val_batch(self, name: str, i: int, rows: slice | None = None) -> Batch:
        """Rows `rows` of held-out batch `i` of source `name`: each reader's block of its own held-out rows (of
        the one held-out set for a source every reader reads whole)."""
        parts = []
        for g, sub in self._blocks(rows):
            reader = self.readers[g]
            if name in self.replicated:
                val = reader.val[name]
                idx = i * self.batch_size + g * self.block + np.arange(sub.start, sub.stop)
                idx[idx >= val.n_rows] = -1
                parts.append(val.rows(idx))
            else:
                parts.append(reader.val_batch(name, i, sub))
        return self._join(parts)

    def describe(self) -> dict[str, Any]:
        return {**self.readers[0].describe(), "sources": self.sources, "readers": len(self.readers)}


def build_readers(data: DataConfig, new: list, old: list, reads: dict[str, SourceRead], tokenizer: Tokenizer,
                  batch_size: int, seq_len: int, written: Written, log: Callable[[str], None] | None,
                  phases: list[Phase]) -> ReaderPipeline:
    """The data.readers pipelines of a run, each over its share of every source's files. The held-out split
    is the source's own (the documents a one-reader run holds out), each reader keeping its files' part."""
    n = data.readers
    shares = {name: deal(read.units, n) for name, read in reads.items()}
    replicated = {name for name, s in shares.items() if s is None}
    sources: dict[str, tuple[TokenizedSource, HeldOut]] = {}  # each source once: its tokens and held-out rule
    for src, _ in new + old:
        tokenized = tokenize_source(src.name, reads[src.name], tokenizer, data.cache_dir, written, data.workers, log)
        sources[src.name] = tokenized, held_out(tokenized, data)
    pipes, described = [], []
    for g in range(n):
        def share(name: str, g: int = g) -> tuple[TokenizedSource, HeldOut, str]:
            tokenized, held = sources[name]
            units = shares[name][g] if shares[name] is not None else list(range(len(reads[name].units)))
            return tokenized.part(units), held, f"@{g}/{n}"

        components, val, desc = build_components(data, new, old, reads, tokenizer, batch_size // n, seq_len,
                                                 written, log if g == 0 else None, share)
        pipes.append(DataPipeline(components, val, tokenizer, batch_size // n, seq_len, data.seed, desc, phases,
                                  data.shuffle_window))
        described.append(desc)
    return ReaderPipeline(pipes, replicated, _merge(described, replicated, reads))


_SUMMED = ("train_rows", "val_rows", "documents", "pieces", "split_documents", "truncated_tokens", "input_tokens")


def _merge(described: list[dict[str, dict[str, Any]]], replicated: set[str],
           reads: dict[str, SourceRead]) -> dict[str, dict[str, Any]]:
    """One description per source across the readers: counts summed (a source every reader reads whole: once),
    the whole source's fingerprint."""
    out = {}
    for name, first in described[0].items():
        d = dict(first, fingerprint=reads[name].fingerprint, cache_hit=all(x[name]["cache_hit"] for x in described),
                 readers="replicated" if name in replicated else "split")
        for key in _SUMMED:
            d[key] = first[key] if name in replicated else sum(x[name][key] for x in described)
        if name not in replicated:
            d["replaced_chars"] = sum(x[name]["replaced_chars"] for x in described)
        out[name] = d
    return out
