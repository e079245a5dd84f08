"""Tokenized sources cached on disk: one shard per file, keyed by (file content, reading rule, tokenizer).

A shard is a directory of `.npy` files (flat tokens, document offsets, and per-token loss weights where a
document has a prompt) and a meta.json written last, read back memory-mapped with `allow_pickle=False`; a
source's tokens are its files' shards in order (a `ShardedArray`: a shard's tokens are opened when first read).
Each shard is written aside and renamed into place as soon as its file is encoded, so a run killed while
tokenizing keeps what it finished and the next encodes only the rest; a changed file or another tokenizer misses
only its own shards; writers on several hosts race to the same content. A run refused for its data undoes what
it added (`Written`), so the cache is as it was.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lmadapt.data import DataError
from lmadapt.data.shards import ShardedArray
from lmadapt.data.sources import Document, Documents, SourceRead, Unit
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.data.written import Written

CACHE_FORMAT = 2  # 1: one entry per source
_ENCODE_CHUNK = 256  # documents per encode call: bounded memory, still batched
_ENCODE_CHARS = 1 << 21
AUTO_WORKERS_BYTES = 64 * 2**20  # data.workers=0: worker processes once this much text is to be encoded


@dataclasses.dataclass
class TokenizedSource:
    """One source as flat token ids; document d is `tokens[doc_starts[d]:doc_starts[d + 1]]`."""

    name: str
    tokens: np.ndarray | ShardedArray  # uint16 or uint32
    doc_starts: np.ndarray  # int64 [n_docs + 1]
    weights: np.ndarray | ShardedArray | None  # uint8 per token: 1 where the token is trained on; None: all
    fingerprint: dict[str, Any]
    replaced_chars: int = 0
    cache_hit: bool = False  # every shard was in the cache
    encoded_files: int = 0  # shards this run encoded
    unit_docs: list[int] | None = None  # documents of each file (from the cache: each file its shard)
    unit_replaced: list[int] | None = None

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1

    def part(self, units: list[int]) -> tuple[TokenizedSource, np.ndarray]:
        """Files `units` (indices, in order) as a source of their own, and the source-wide ids of its documents;
        nothing is read (document offsets are already here, tokens are read when sliced)."""
        if not isinstance(self.tokens, ShardedArray) or self.unit_docs is None or self.unit_replaced is None:
            raise ValueError("only a source read from the token cache has parts")
        off = np.concatenate([[0], np.cumsum(self.unit_docs, dtype=np.int64)])
        ids = np.concatenate([np.arange(off[u], off[u + 1]) for u in units] or [np.zeros(0, np.int64)])
        starts, base = [np.zeros(1, np.int64)], 0
        for u in units:
            local = self.doc_starts[off[u]:off[u + 1] + 1] - self.doc_starts[off[u]]
            starts.append(local[1:] + base)
            base += int(local[-1])
        weights = self.weights.subset(units) if isinstance(self.weights, ShardedArray) else None
        return dataclasses.replace(self, tokens=self.tokens.subset(units), doc_starts=np.concatenate(starts),
                                   weights=weights, replaced_chars=sum(self.unit_replaced[u] for u in units),
                                   unit_docs=[self.unit_docs[u] for u in units],
                                   unit_replaced=[self.unit_replaced[u] for u in units]), ids.astype(np.int64)


def shard_key(unit: Unit, tokenizer: Tokenizer) -> str:
    """A shard's name: its file's content and reading rule, the tokenizer, and the cache format."""
    blob = json.dumps({"format": CACHE_FORMAT, "unit": unit.key, "tokenizer": tokenizer.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def tokenize_source(name: str, read: SourceRead, tokenizer: Tokenizer, cache_dir: str | None,
                    written: Written | None = None, workers: int = 1,
                    log: Callable[[str], None] | None = None) -> TokenizedSource:
    """Tokens of every document of `read`: each file's shard from the cache, else encoded (by `workers`
    processes; 0: one per core once there are AUTO_WORKERS_BYTES to encode) and stored as it finishes.

    Memory holds one file's text and one chunk's tokens per process, never the source. Without `cache_dir` the
    tokens are encoded into memory. What this adds to the cache is recorded in `written` (for an undo).
    """
    if not cache_dir:
        sink = _Sink(None, tokenizer)
        _encode(read.iter_documents(), tokenizer, sink)
        tokens, starts, weights = sink.arrays()
        return TokenizedSource(name, tokens, starts, weights, read.fingerprint, read.replaced_chars)
    root = os.path.join(os.path.expanduser(cache_dir), "tokens")
    entries = [os.path.join(root, shard_key(u, tokenizer)) for u in read.units]
    todo = {e: u for u, e in zip(read.units, entries, strict=True) if _meta(e) is None}  # a file twice: once
    written = written if written is not None else Written()
    if todo:
        written.folders(root)
        sweep(root)
        n = _worker_count(workers, list(todo.values()))
        if log:
            mb = sum(u.size for u in todo.values()) / 1e6
            log(f"data {name}: tokenizing {len(todo)} of {len(entries)} files ({mb:,.1f} MB)"
                + (f" in {n} processes" if n > 1 else ""))
        writer = uuid.uuid4().hex  # in each shard this run writes: what an undo may remove, and nothing else
        try:
            if n > 1:
                from lmadapt.data.tokenize_workers import run_workers  # noqa: PLC0415 - only for a large corpus

                run_workers(list(todo.items()), tokenizer, n, root, writer)
            else:
                for entry, unit in todo.items():
                    write_shard(unit.read(), unit, tokenizer, entry, writer)
        finally:  # this run's shards, its stopped workers' included; never a racing writer's identical one
            for entry in todo:
                if (meta := _meta(entry)) is not None and meta.get("writer") == writer:
                    written.add(entry)
    return _assemble(name, read, entries, tokenizer, encoded=len(todo))


def _worker_count(workers: int, units: list[Unit]) -> int:
    if any(u.job is None for u in units):
        return 1
    if workers == 0:
        big = sum(u.size for u in units) >= AUTO_WORKERS_BYTES
        workers = len(os.sched_getaffinity(0)) if big else 1
    return max(1, min(workers, len(units)))


def write_shard(docs: Documents, unit: Unit | dict[str, Any], tokenizer: Tokenizer, entry: str, writer: str) -> None:
    """Encode `docs` into the shard `entry` (written aside, renamed into place, `writer` recorded in it; when
    another writer's identical shard got there first, that one stays)."""
    with staging(os.path.dirname(entry)) as tmp:
        sink = _Sink(tmp, tokenizer)
        _encode(docs, tokenizer, sink)
        tokens, starts, weights = sink.arrays()
        key = unit.key if isinstance(unit, Unit) else unit
        meta = {"unit": key, "tokenizer": tokenizer.fingerprint, "docs": len(starts) - 1, "tokens": len(tokens),
                "weights": weights is not None, "replaced_chars": docs.replaced, "dtype": str(tokens.dtype),
                "writer": writer}
        del tokens, weights  # the memory maps, before the rename
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)  # written last: its presence marks a complete shard
        if os.path.isdir(entry) and _meta(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)  # a damaged shard (no readable meta.json): replaced
        unlock_name(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if _meta(entry) is None:
                raise


_TMP = ".tmp-"
_LOCK = ".lock"
_ORPHAN_S = 3600  # a staging folder without its lock file (its writer died before taking it) this old: swept


@contextlib.contextmanager
def staging(folder: str) -> Iterator[str]:
    """A staging folder in `folder`, held under an exclusive flock while it is written: `sweep` removes only
    folders whose lock it can take, whose writer is gone, whatever host or PID namespace it ran in. Before
    renaming it into place, the writer removes the lock file (`unlock_name`); its lock is held to the end."""
    tmp = tempfile.mkdtemp(prefix=_TMP, dir=folder)
    lock = open(os.path.join(tmp, _LOCK), "w")  # noqa: SIM115 - held until the folder is gone
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()


def unlock_name(tmp: str) -> None:
    """Remove a staging folder's lock file before it is renamed into place (the lock itself stays held)."""
    os.remove(os.path.join(tmp, _LOCK))


def sweep(root: str) -> None:
    """Remove staging folders whose writer is gone (killed mid-shard): their lock can be taken. A live writer's,
    on this host or another, is left alone; so is one without a lock file unless it is an hour old."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(_TMP):
            continue
        try:
            fd = os.open(os.path.join(path, _LOCK), os.O_RDWR)
        except FileNotFoundError:  # being renamed into place, or its writer died before locking
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(path) > _ORPHAN_S:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # held: its writer is at work
        finally:
            os.close(fd)


def _meta(entry: str) -> dict[str, Any] | None:
    """A shard's meta.json, or None when it is missing or unreadable (the shard is then encoded again)."""
    try:
        with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and all(isinstance(meta.get(k), int) for k in ("docs", "tokens", "replaced_chars"))
    return meta if ok else None


def _assemble(name: str, read: SourceRead, entries: list[str], tokenizer: Tokenizer, encoded: int) -> TokenizedSource:
    """The source from its shards: document offsets read now (8 bytes a document), tokens when first sliced."""
    metas = [_meta(e) for e in entries]
    if any(m is None for m in metas):
        raise DataError(f"token cache: shard {entries[metas.index(None)]} is unreadable after writing it")
    replaced = 0
    for unit, meta in zip(read.units, metas, strict=True):
        if meta["replaced_chars"] and read.decode_errors == "fail":
            for _ in unit.read():  # raises the error naming file and byte
                pass
        replaced += meta["replaced_chars"]
    if not sum(m["docs"] for m in metas):
        raise DataError(read.empty)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    lengths = [m["tokens"] for m in metas]
    tokens = ShardedArray([os.path.join(e, "tokens.npy") for e in entries], lengths, dtype)
    weights = None
    if any(m["weights"] for m in metas):
        weights = ShardedArray([os.path.join(e, "weights.npy") if m["weights"] else None
                                for e, m in zip(entries, metas, strict=True)], lengths, np.uint8, fill=1)
    starts = [np.zeros(1, np.int64)]
    for base, e in zip(tokens.bases[:-1].tolist(), entries, strict=True):
        starts.append(np.load(os.path.join(e, "doc_starts.npy"), allow_pickle=False)[1:] + base)
    return TokenizedSource(name, tokens, np.concatenate(starts), weights, read.fingerprint, replaced,
                           cache_hit=encoded == 0, encoded_files=encoded, unit_docs=[m["docs"] for m in metas],
                           unit_replaced=[m["replaced_chars"] for m in metas])


def _encode(docs: Iterable[Document], tokenizer: Tokenizer, sink: _Sink) -> None:
    """bos (if any) + prompt + text + eos of every document into `sink`, a chunk of documents an encode call
    (bounded memory, still batched: the tokenizers encode a list on all cores)."""
    for chunk in _chunks(docs):
        bodies = tokenizer.encode([d.text for d in chunk])
        supervised = any(d.prompt is not None for d in chunk)
        prompts = tokenizer.encode([d.prompt or "" for d in chunk]) if supervised else [[] for _ in chunk]
        sink.append([sink.head + p + b + [tokenizer.eos_id] for p, b in zip(prompts, bodies, strict=True)],
                    [len(p) for p in prompts] if supervised else None)


def _chunks(docs: Iterable[Document]) -> Iterable[list[Document]]:
    """`_ENCODE_CHUNK` documents at a time, fewer once they hold `_ENCODE_CHARS` characters: a few long documents
    would otherwise make one call hold their tokens several times over (as Python ints, about 36 bytes each)."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d.text) + len(d.prompt or "")
        if len(chunk) >= _ENCODE_CHUNK or size >= _ENCODE_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


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
