"""Tokenized sources cached on disk, keyed by (source fingerprint, tokenizer fingerprint).

A cache entry is a directory of `.npy` files (flat tokens, document offsets, per-token loss weights)
read back memory-mapped with `allow_pickle=False`. Entries are written aside and renamed into place,
so a crash never leaves a half entry, and concurrent writers (several hosts) simply race to the same
content.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from lmadapt.data.sources import Document, SourceRead
from lmadapt.data.tokenizers import Tokenizer

CACHE_FORMAT = 1
_ENCODE_CHUNK = 256  # documents per encode call: bounded memory, still batched


@dataclasses.dataclass
class TokenizedSource:
    """One source as flat token ids; document d is `tokens[doc_starts[d]:doc_starts[d + 1]]`."""

    name: str
    tokens: np.ndarray  # uint16 or uint32
    doc_starts: np.ndarray  # int64 [n_docs + 1]
    weights: np.ndarray | None  # uint8 per token: 1 where the token is trained on; None means all
    fingerprint: dict[str, Any]
    replaced_chars: int = 0
    cache_hit: bool = False

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1


def cache_key(read: SourceRead, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "source": read.fingerprint, "tokenizer": tokenizer.fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def tokenize_source(name: str, read: SourceRead, tokenizer: Tokenizer, cache_dir: str | None,
                    pending: list[Callable[[], None]] | None = None) -> TokenizedSource:
    """Tokens of every document of `read`, from the cache when it holds them, else encoded and stored.

    With `pending`, the store is appended to it instead of done now (the caller stores once every source
    is known to be usable, so a run refused for its data leaves nothing behind).
    """
    key = cache_key(read, tokenizer)
    entry = os.path.join(os.path.expanduser(cache_dir), "tokens", key) if cache_dir else None
    if entry and os.path.isfile(os.path.join(entry, "meta.json")):
        return _load(entry, name, read)
    tokens, starts, weights = _encode(read.documents, tokenizer)
    if entry:
        meta = {"name": name, "fingerprint": read.fingerprint, "tokenizer": tokenizer.fingerprint}
        store = functools.partial(_store, entry, tokens, starts, weights, meta)
        if pending is None:
            store()
        else:
            pending.append(store)
    return TokenizedSource(name, tokens, starts, weights, read.fingerprint, read.replaced_chars)


def _encode(docs: list[Document], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    supervised = any(d.prompt is not None for d in docs)
    parts, weight_parts, lengths = [], [], []
    for lo in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[lo:lo + _ENCODE_CHUNK]
        bodies = tokenizer.encode([d.text for d in chunk])
        prompts = tokenizer.encode([d.prompt or "" for d in chunk]) if supervised else [[] for _ in chunk]
        for prompt, body in zip(prompts, bodies, strict=True):
            ids = head + prompt + body + [tokenizer.eos_id]
            parts.append(np.asarray(ids, dtype))
            lengths.append(len(ids))
            if supervised:
                # Loss on the completion and its eos; bos and prompt are context only.
                w = np.zeros(len(ids), np.uint8)
                w[len(head) + len(prompt):] = 1
                weight_parts.append(w)
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    weights = np.concatenate(weight_parts) if supervised else None
    return tokens, starts, weights


def _store(entry: str, tokens: np.ndarray, starts: np.ndarray, weights: np.ndarray | None,
           meta: dict[str, Any]) -> None:
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        np.save(os.path.join(tmp, "tokens.npy"), tokens)
        np.save(os.path.join(tmp, "doc_starts.npy"), starts)
        if weights is not None:
            np.save(os.path.join(tmp, "weights.npy"), weights)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)  # written last: its presence marks a complete entry
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, "meta.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _load(entry: str, name: str, read: SourceRead) -> TokenizedSource:
    def arr(file: str) -> np.ndarray:
        return np.load(os.path.join(entry, file), mmap_mode="r", allow_pickle=False)

    weights = arr("weights.npy") if os.path.isfile(os.path.join(entry, "weights.npy")) else None
    return TokenizedSource(name, arr("tokens.npy"), np.asarray(arr("doc_starts.npy")), weights, read.fingerprint,
                           read.replaced_chars, cache_hit=True)
