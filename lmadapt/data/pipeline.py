"""The input pipeline: sources -> tokens (cached) -> packed rows -> a deterministic weighted mixture.

Every global batch is a pure function of (seed, step). Slot g = step * batch_size + i of the global
batch stream is given to a source by a closed-form low-discrepancy rule, which also says how many
earlier slots that source has served; that count indexes the source's rows, reshuffled every epoch.
So a resumed run, or a run on any number of processes (each building only its own rows), sees exactly
the batches of an uninterrupted single-process run, and each source's share of every batch is its
weight to within one row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from lmadapt.config import DataConfig, SourceConfig, TokenizerConfig
from lmadapt.data import DataError
from lmadapt.data.batch import Batch
from lmadapt.data.packing import PackedRows, pack
from lmadapt.data.sources import SourceRead, read_source
from lmadapt.data.token_cache import TokenizedSource, tokenize_source
from lmadapt.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_hf_tokenizer,
    load_tokenizer,
    train_bpe,
    train_sentencepiece,
)


@dataclasses.dataclass
class Component:
    """One source in the training mixture."""

    name: str
    rows: PackedRows
    weight: float  # normalised: the components' weights sum to 1
    replay: bool
    _perms: OrderedDict = dataclasses.field(default_factory=OrderedDict, repr=False)
    _seed: int = 0

    def __post_init__(self) -> None:
        self.loss_tokens = self.rows.row_loss_tokens()

    def row_of(self, j: np.ndarray) -> np.ndarray:
        """Row index of this component's j-th draw: epoch j // n_rows, reshuffled per epoch."""
        n = self.rows.n_rows
        epochs, within = np.divmod(j, n)
        out = np.empty_like(j)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self._seed, zlib.crc32(self.name.encode()), epoch])
            self._perms[epoch] = rng.permutation(self.rows.n_rows)
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]


def assign_slots(slots: np.ndarray, weights: list[float], offsets: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(component, draw index within the component) of global slots, in closed form.

    Component k takes slot g of the stream left over by components < k when
    floor((g + 1) p + u) > floor(g p + u), with p its weight relative to what is left; floor(g p + u)
    counts its earlier slots. Every window of n consecutive slots holds floor or ceil of n * p of them.
    """
    comp = np.full(len(slots), len(weights) - 1, np.int64)
    index = slots.astype(np.int64).copy()
    rest = slots.astype(np.int64)
    left = 1.0
    active = np.ones(len(slots), bool)
    for k, (w, u) in enumerate(zip(weights[:-1], offsets[:-1], strict=True)):
        p = min(w / left, 1.0)
        before = np.floor(rest * p + u).astype(np.int64)
        mine = active & (np.floor((rest + 1) * p + u).astype(np.int64) > before)
        comp[mine], index[mine] = k, before[mine]
        active &= ~mine
        rest = rest - before
        index[active] = rest[active]
        left -= w
    return comp, index


class DataPipeline:
    """Training batches, held-out batches per source, and accounting of what was trained on."""

    def __init__(self, components: list[Component], val: dict[str, PackedRows], tokenizer: Tokenizer,
                 batch_size: int, seq_len: int, seed: int, sources: dict[str, dict[str, Any]]):
        self.components, self.val, self.tokenizer = components, val, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.sources = sources  # name -> fingerprint, weights and packing stats (for the version record)
        rng = np.random.default_rng([seed, 7919])
        self._offsets = rng.random(len(components)).tolist()
        self._weights = [c.weight for c in components]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch(self, step: int, rows: slice | None = None) -> Batch:
        """Rows `rows` (default: all) of the global training batch for `step`."""
        rows = rows or slice(0, self.batch_size)
        slots = step * self.batch_size + np.arange(rows.start, rows.stop)
        comp, index = assign_slots(slots, self._weights, self._offsets)
        out: Batch | None = None
        for k in np.unique(comp).tolist():
            sel = comp == k
            c = self.components[k]
            part = c.rows.rows(c.row_of(index[sel]))
            if out is None:
                out = {key: np.empty((len(slots), *v.shape[1:]), v.dtype) for key, v in part.items()}
            for key, v in part.items():
                out[key][sel] = v
        assert out is not None
        return out

    def source_counts(self, step: int) -> dict[str, int]:
        """Rows each source contributes to the global batch of `step` (what the mixture test checks)."""
        slots = step * self.batch_size + np.arange(self.batch_size)
        comp, _ = assign_slots(slots, self._weights, self._offsets)
        return {c.name: int((comp == k).sum()) for k, c in enumerate(self.components)}

    def tokens_seen(self, steps: int) -> dict[str, int]:
        """Loss-carrying tokens each source supplied in the first `steps` steps (exact, no state)."""
        n = steps * self.batch_size
        if n == 0:
            return {c.name: 0 for c in self.components}
        out = {}
        for k, c in enumerate(self.components):
            # Draws before slot n: the draw index the next slot would get, computed per component.
            draws = int(_draws_before(n, k, self._weights, self._offsets))
            per_row = c.loss_tokens
            full, part = divmod(draws, c.rows.n_rows)
            total = full * int(per_row.sum())
            if part:
                total += int(per_row[c._perm(full)[:part]].sum())
            out[c.name] = total
        return out

    def val_batches(self, name: str, limit: int) -> int:
        """How many held-out batches source `name` has (at most `limit`); the last may be partly empty."""
        return min(limit, -(-self.val[name].n_rows // self.batch_size))

    def val_batch(self, name: str, i: int, rows: slice | None = None) -> Batch:
        """Rows `rows` of held-out batch `i` of source `name` (rows past the end are empty)."""
        rows = rows or slice(0, self.batch_size)
        idx = i * self.batch_size + np.arange(rows.start, rows.stop)
        idx[idx >= self.val[name].n_rows] = -1
        return self.val[name].rows(idx)

    def describe(self) -> dict[str, Any]:
        """What this pipeline trains on: sources with fingerprints, weights and stats; tokenizer."""
        return {"tokenizer": self.tokenizer.fingerprint, "seq_len": self.seq_len, "seed": self.seed,
                "sources": self.sources}


def _draws_before(n: int, k: int, weights: list[float], offsets: list[float]) -> int:
    rest, left = n, 1.0
    for j, (w, u) in enumerate(zip(weights, offsets, strict=True)):
        if j == len(weights) - 1:
            return rest
        p = min(w / left, 1.0)
        before = int(np.floor(rest * p + u))
        if j == k:
            return before
        rest -= before
        left -= w
    return rest


def split_documents(n_docs: int, val_fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out documents of a source: never trained on, the same in every run."""
    if n_docs < 2:
        raise DataError(f"source {name!r} has {n_docs} document; a held-out split needs at least 2 (use "
                        f"documents: chars or blank_line to cut files into documents)")
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    order = np.random.default_rng([seed, zlib.crc32(name.encode()), 1]).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# Bumped whenever what a trained tokenizer is changes, so cached ones from before are not reused
# (v1: SentencePiece with NFKC and whitespace collapsing, trained line by line; v2: lossless).
TRAINED_TOKENIZER_VERSION = 2


def resolve_tokenizer(cfg: TokenizerConfig, reads: dict[str, SourceRead], cache_dir: str | None) -> Tokenizer:
    """The run's tokenizer: bytes, a given file, or one trained on the sources (cached by settings and sources)."""
    if cfg.kind == "bytes":
        return ByteTokenizer()
    if cfg.path:
        path = os.path.expanduser(cfg.path)
        if cfg.kind == "hf":  # a Hugging Face tokenizer directory (tokenizer.json, else tokenizer.model) or file
            return load_tokenizer(path)
        return SentencePieceTokenizer.load(path) if cfg.kind == "sentencepiece" else load_hf_tokenizer(path)
    settings: dict[str, Any] = {"vocab_size": cfg.vocab_size, "user_defined_symbols": cfg.user_defined_symbols}
    if cfg.kind == "sentencepiece":
        settings.update(model_type=cfg.model_type, byte_fallback=cfg.byte_fallback)
    key = hashlib.sha256(json.dumps({"sources": {n: r.fingerprint for n, r in sorted(reads.items())}, "kind": cfg.kind,
                                     "version": TRAINED_TOKENIZER_VERSION, **settings},
                                    sort_keys=True).encode()).hexdigest()[:40]
    path = os.path.join(os.path.expanduser(cache_dir), "tokenizers", key) if cache_dir else None
    if path and os.path.isdir(path):
        try:
            return load_tokenizer(path)
        except TokenizerError:
            pass  # a damaged cache entry: train again and replace it
    texts = (d.text if d.prompt is None else d.prompt + d.text for r in reads.values() for d in r.documents)
    tok = train_sentencepiece(texts, **settings) if cfg.kind == "sentencepiece" else train_bpe(texts, **settings)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tok.save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process cached the same tokenizer first: same settings, same tokenizer
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_pipeline(data: DataConfig, tok_cfg: TokenizerConfig, batch_size: int, seq_len: int,
                   tokenizer: Tokenizer | None = None, log: Callable[[str], None] | None = None) -> DataPipeline:
    """Read, tokenize (or load from cache), split and pack every source; weigh them into a mixture.

    `tokenizer` overrides `tok_cfg` (a run started from a model version keeps that version's tokenizer).
    """
    new = [(s, False) for s in data.sources]
    old = [(s, True) for s in data.replay.sources] if data.replay.fraction > 0 else []
    reads = {s.name: read_source(s, data.decode_errors, data.max_document_bytes) for s, _ in new + old}
    if tokenizer is None:
        tokenizer = resolve_tokenizer(tok_cfg, {s.name: reads[s.name] for s, _ in new}, data.cache_dir)
    components, val, described = [], {}, {}
    stores: list[Callable[[], None]] = []  # cache writes, done once every source has packed
    for src, replay in new + old:
        tokenized = tokenize_source(src.name, reads[src.name], tokenizer, data.cache_dir, pending=stores)
        train_rows, val_rows = _pack_source(src, tokenized, data, tokenizer, batch_size, seq_len)
        group = old if replay else new
        share = data.replay.fraction if replay else 1.0 - (data.replay.fraction if old else 0.0)
        weight = share * src.weight / sum(s.weight for s, _ in group)
        components.append(Component(src.name, train_rows, weight, replay, _seed=data.seed))
        val[src.name] = val_rows
        stats = dataclasses.asdict(train_rows.stats)
        described[src.name] = {"weight": weight, "replay": replay, "fingerprint": tokenized.fingerprint,
                               "train_rows": train_rows.n_rows, "val_rows": val_rows.n_rows,
                               "replaced_chars": tokenized.replaced_chars, "cache_hit": tokenized.cache_hit, **stats}
        if log:
            log(_summary(src.name, described[src.name], data.long_docs))
    for store in stores:
        store()
    return DataPipeline(components, val, tokenizer, batch_size, seq_len, data.seed, described)


def _pack_source(src: SourceConfig, tokenized: TokenizedSource, data: DataConfig, tokenizer: Tokenizer,
                 batch_size: int, seq_len: int) -> tuple[PackedRows, PackedRows]:
    train_ids, val_ids = split_documents(tokenized.n_docs, data.val_fraction, data.seed, src.name)
    seed = [data.seed, zlib.crc32(src.name.encode())]
    args = (tokenized.tokens, tokenized.weights, tokenized.doc_starts)
    train_rows = pack(*args, train_ids, seq_len, tokenizer.pad_id, data.long_docs, shuffle_seed=seed)
    val_rows = pack(*args, val_ids, seq_len, tokenizer.pad_id, data.long_docs)
    if train_rows.n_rows < batch_size:
        raise DataError(f"source {src.name!r} packs into {train_rows.n_rows} training rows of {seq_len} tokens, "
                        f"fewer than one batch (train.batch_size={batch_size}); add data or use a smaller batch")
    if val_rows.n_rows == 0:
        raise DataError(f"source {src.name!r}: the held-out split is empty; raise data.val_fraction")
    return train_rows, val_rows


def _summary(name: str, d: dict[str, Any], long_docs: str) -> str:
    line = (f"data {name}: {d['documents']:,} docs -> {d['train_rows']:,} train rows, {d['val_rows']:,} held-out rows, "
            f"weight {d['weight']:.3f}{' (replay)' if d['replay'] else ''}, "
            f"{'cached' if d['cache_hit'] else 'tokenized'}")
    if d["split_documents"] and long_docs == "split":
        line += f"; {d['split_documents']:,} long docs split"
    if d["truncated_tokens"]:
        line += f"; {d['truncated_tokens']:,} tokens truncated from long docs"
    if d["replaced_chars"]:
        line += f"; {d['replaced_chars']:,} undecodable bytes replaced"
    return line
