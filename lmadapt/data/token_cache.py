"""Tokenized sources cached on disk, keyed by (source fingerprint, tokenizer fingerprint).

A cache entry is a directory of `.npy` files (flat tokens, document offsets, per-token loss weights)
read back memory-mapped with `allow_pickle=False`. Entries are written aside and renamed into place,
so a crash never leaves a half entry, and concurrent writers (several hosts) simply race to the same
content.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
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

    Encoding streams: documents come file by file and their tokens go to the entry's files (written aside,
    memory-mapped back), so memory holds one file's text and one chunk's tokens, not the source. With
    `pending`, the entry's commit (a `Staged`: call it to rename the entry into place, `.abort()` to drop it)
    is appended to it instead of done now: the caller commits once every source is known to be usable, so a
    run refused for its data leaves nothing behind.
    """
    key = cache_key(read, tokenizer)
    entry = os.path.join(os.path.expanduser(cache_dir), "tokens", key) if cache_dir else None
    if entry and os.path.isfile(os.path.join(entry, "meta.json")):
        return _load(entry, name, read)
    if entry is None:
        sink = _Sink(None, tokenizer)
        _encode(read.iter_documents(), tokenizer, sink)
        tokens, starts, weights = sink.arrays()
        return TokenizedSource(name, tokens, starts, weights, read.fingerprint, read.replaced_chars)
    made, folder = [], os.path.dirname(entry)
    while not os.path.isdir(folder):  # the folders this creates, which an abort removes again
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    staged = Staged(tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry)), entry, made)
    try:
        sink = _Sink(staged.tmp, tokenizer)
        _encode(read.iter_documents(), tokenizer, sink)
        tokens, starts, weights = sink.arrays()
    except BaseException:
        staged.abort()
        raise
    staged.meta = {"name": name, "fingerprint": read.fingerprint, "tokenizer": tokenizer.fingerprint,
                   "replaced_chars": read.replaced_chars}
    if pending is None:
        staged()
    else:
        pending.append(staged)
    return TokenizedSource(name, tokens, starts, weights, read.fingerprint, read.replaced_chars)


def _encode(docs: Iterable[Document], tokenizer: Tokenizer, sink: _Sink) -> None:
    """bos (if any) + prompt + text + eos of every document into `sink`, `_ENCODE_CHUNK` documents an encode call
    (bounded memory, still batched: the tokenizers encode a list on all cores)."""
    for chunk in iter(functools.partial(lambda it: list(itertools.islice(it, _ENCODE_CHUNK)), iter(docs)), []):
        bodies = tokenizer.encode([d.text for d in chunk])
        supervised = any(d.prompt is not None for d in chunk)
        prompts = tokenizer.encode([d.prompt or "" for d in chunk]) if supervised else [[] for _ in chunk]
        sink.append([sink.head + p + b + [tokenizer.eos_id] for p, b in zip(prompts, bodies, strict=True)],
                    [len(p) for p in prompts] if supervised else None)


class _Sink:
    """Where encoded documents go: memory (`directory` None) or 1-D .npy files written piece by piece.

    Loss weights (1 where the token is trained on) exist once any document has a prompt: from then on the
    bos and prompt tokens are context only, and the weights of the documents before it are filled in."""

    def __init__(self, directory: str | None, tokenizer: Tokenizer):
        self.directory = directory
        self.dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
        self.head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.lengths = array.array("q")
        self.tokens = _Column(directory and os.path.join(directory, "tokens.npy"), self.dtype)
        self.weights: _Column | None = None

    def _weights(self, lengths: Sequence[int], prompts: Sequence[int]) -> np.ndarray:
        w = np.ones(sum(lengths), np.uint8)
        at = 0
        for n, p in zip(lengths, prompts, strict=True):
            w[at:at + len(self.head) + p] = 0
            at += n
        return w

    def append(self, rows: list[list[int]], prompt_lengths: list[int] | None) -> None:
        lengths = [len(r) for r in rows]
        if prompt_lengths is not None and self.weights is None:
            self.weights = _Column(self.directory and os.path.join(self.directory, "weights.npy"), np.uint8)
            for lo in range(0, len(self.lengths), 65536):  # the documents before, prompt-less
                block = self.lengths[lo:lo + 65536]
                self.weights.append(self._weights(block, [0] * len(block)))
        self.tokens.append(np.fromiter(itertools.chain.from_iterable(rows), self.dtype, sum(lengths)))
        if self.weights is not None:
            self.weights.append(self._weights(lengths, prompt_lengths or [0] * len(rows)))
        self.lengths.extend(lengths)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        starts = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(np.frombuffer(self.lengths, np.int64), out=starts[1:])
        if self.directory:
            np.save(os.path.join(self.directory, "doc_starts.npy"), starts)
        return self.tokens.close(), starts, self.weights.close() if self.weights is not None else None


class _Column:
    """A 1-D array appended in pieces: in memory (`path` None), or a .npy file whose fixed-size header is written
    last, read back memory-mapped."""

    HEADER = 128  # bytes: magic, version, length and the padded dict of any 1-D shape

    def __init__(self, path: str | None, dtype: Any):
        self.path, self.dtype, self.n, self.parts = path, np.dtype(dtype), 0, []
        self.file = open(path, "wb") if path else None  # noqa: SIM115 - closed in close()
        if self.file:
            self.file.write(b"\0" * self.HEADER)

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self.dtype)
        if self.file:
            self.file.write(a.tobytes())
        else:
            self.parts.append(a)
        self.n += a.size

    def close(self) -> np.ndarray:
        if not self.file:
            return np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        meta = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)}
        text = repr(meta).ljust(self.HEADER - 10 - 1) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1"))
        self.file.close()
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


class Staged:
    """A cache entry written aside: calling it renames it into place (a racing writer's identical entry wins);
    `abort()` removes it, and the folders `made` for it, so a refused run leaves the cache as it was."""

    def __init__(self, tmp: str, entry: str, made: list[str]):
        self.tmp, self.entry, self.made, self.meta = tmp, entry, made, {}

    def __call__(self) -> None:
        try:
            with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(self.meta, f)  # written last: its presence marks a complete entry
            try:
                os.rename(self.tmp, self.entry)
            except OSError:
                if not os.path.isfile(os.path.join(self.entry, "meta.json")):
                    raise
        finally:
            self.abort()

    def abort(self) -> None:
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if not os.path.isdir(self.entry):
            for folder in self.made:  # innermost first; a folder another entry now uses is kept
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _load(entry: str, name: str, read: SourceRead) -> TokenizedSource:
    """A cache hit: the tokens memory-mapped, the text never decoded (what memory stays bounded by), except
    where the entry cannot vouch for it: written before it counted replaced bytes, or a strict decode policy
    and replaced bytes (decoding again raises the error naming file and byte)."""
    def arr(file: str) -> np.ndarray:
        return np.load(os.path.join(entry, file), mmap_mode="r", allow_pickle=False)

    try:
        with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    replaced = meta.get("replaced_chars") if isinstance(meta, dict) else None
    if not isinstance(replaced, int) or (replaced and read.decode_errors == "fail"):
        replaced = read.replaced_chars
    weights = arr("weights.npy") if os.path.isfile(os.path.join(entry, "weights.npy")) else None
    return TokenizedSource(name, arr("tokens.npy"), np.asarray(arr("doc_starts.npy")), weights, read.fingerprint,
                           replaced, cache_hit=True)
