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
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lmadapt.data import DataError
from lmadapt.data.shards import Column, ShardedArray
from lmadapt.data.shuffle import unit_id
from lmadapt.data.sources import Document, Documents, SourceRead, Unit
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.data.written import Written

CACHE_FORMAT = 2  # 1: one entry per source
_ENCODE_CHUNK = 256  # documents per encode call: bounded memory, still batched
_ENCODE_CHARS = 1 << 21
AUTO_WORKERS_BYTES = 64 * 2**20  # data.workers=0: worker processes once this much text is to be encoded


@dataclasses.dataclass
class TokenizedSource:
    """One source as token ids, a part per file (unit): document j of unit p is tokens
    `[bases[p] + starts[p][j], bases[p] + starts[p][j + 1])`, `starts[p]` the file's own offsets (its shard's
    doc_starts.npy, read when planned), so nothing here grows with the number of documents."""

    name: str
    tokens: ShardedArray  # uint16 or uint32
    starts: list[str | np.ndarray]  # per unit: int64 [docs + 1] from 0 (a .npy path, or the array)
    weights: ShardedArray | None  # uint8 per token: 1 where the token is trained on; None: all
    fingerprint: dict[str, Any]
    unit_docs: list[int]  # documents of each unit
    unit_ids: list[int]  # each unit's identity in the held-out rule (its content key)
    unit_replaced: list[int]
    replaced_chars: int = 0
    cache_hit: bool = False  # every shard was in the cache
    encoded_files: int = 0  # shards this run encoded
    entries: list[str] | None = None  # each unit's shard name (None: tokenized in memory)
    unit_index: list[int] | None = None  # each unit's index in the whole source (a part's units)

    def __post_init__(self) -> None:
        if self.unit_index is None:
            self.unit_index = list(range(len(self.unit_docs)))

    @property
    def n_docs(self) -> int:
        return int(sum(self.unit_docs))

    def bounds(self, p: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(first token, end) in `tokens` of documents lo..hi-1 of unit p. A shard's offsets are mapped for the
        call only: planning walks every document once, and pages kept mapped would stay in the RSS."""
        s = self.starts[p]
        if isinstance(s, str):
            s = np.load(s, mmap_mode="r", allow_pickle=False)
        local = np.asarray(s[lo:hi + 1], np.int64) + self.tokens.bases[p]
        return local[:-1], local[1:]

    @property
    def doc_starts(self) -> np.ndarray:
        """Every document's first token and the end, in one array (8 bytes a document: for small sources)."""
        parts = [self.bounds(p, 0, n)[0] for p, n in enumerate(self.unit_docs)]
        return np.concatenate([*parts, [len(self.tokens)]]).astype(np.int64)

    def part(self, units: list[int]) -> TokenizedSource:
        """Units `units` (indices, in order) as a source of their own; nothing is read."""
        weights = self.weights.subset(units) if self.weights is not None else None
        pick = lambda xs: [xs[u] for u in units]  # noqa: E731
        return dataclasses.replace(self, tokens=self.tokens.subset(units), starts=pick(self.starts), weights=weights,
                                   unit_docs=pick(self.unit_docs), unit_ids=pick(self.unit_ids),
                                   unit_replaced=pick(self.unit_replaced), replaced_chars=sum(pick(self.unit_replaced)),
                                   entries=pick(self.entries) if self.entries else None,
                                   unit_index=pick(self.unit_index))


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
        return _in_memory(name, read, tokenizer)
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
    """The source from its shards (only their meta.json read now: offsets and tokens are opened when first used)."""
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
    lengths = [m["tokens"] for m in metas]
    tokens = ShardedArray([os.path.join(e, "tokens.npy") for e in entries], lengths, _dtype(tokenizer))
    weights = None
    if any(m["weights"] for m in metas):
        weights = ShardedArray([os.path.join(e, "weights.npy") if m["weights"] else None
                                for e, m in zip(entries, metas, strict=True)], lengths, np.uint8, fill=1)
    return TokenizedSource(name, tokens, [os.path.join(e, "doc_starts.npy") for e in entries], weights,
                           read.fingerprint, [m["docs"] for m in metas], [unit_id(u.key) for u in read.units],
                           [m["replaced_chars"] for m in metas], replaced, cache_hit=encoded == 0,
                           encoded_files=encoded, entries=entries)


def _in_memory(name: str, read: SourceRead, tokenizer: Tokenizer) -> TokenizedSource:
    """The source encoded into memory (no cache dir), a part per unit as from the cache."""
    parts = []
    for unit in read.units:
        sink = _Sink(None, tokenizer)
        docs = unit.read()
        _encode(docs, tokenizer, sink)
        parts.append((*sink.arrays(), docs.replaced))
    docs = [len(p[1]) - 1 for p in parts]
    if not sum(docs):
        raise DataError(read.empty)
    lengths = [len(p[0]) for p in parts]
    weights = None
    if any(p[2] is not None for p in parts):
        weights = ShardedArray([p[2] for p in parts], lengths, np.uint8, fill=1)
    replaced = [p[3] for p in parts]
    return TokenizedSource(name, ShardedArray([p[0] for p in parts], lengths, _dtype(tokenizer)),
                           [p[1] for p in parts], weights, read.fingerprint, docs,
                           [unit_id(u.key) for u in read.units], replaced, sum(replaced))


def _dtype(tokenizer: Tokenizer) -> Any:
    return np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32


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
        self.dtype = _dtype(tokenizer)
        self.head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.lengths = array.array("q")
        self.tokens = Column(directory and os.path.join(directory, "tokens.npy"), self.dtype)
        self.weights: Column | None = None

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
            self.weights = Column(self.directory and os.path.join(self.directory, "weights.npy"), np.uint8)
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
