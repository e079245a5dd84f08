"""Data sources: local text, JSONL and tensorflow-datasets, as units (a file, a range of records) of documents
read when asked for, with a fingerprint.

A document is text to train on, optionally with a prompt before it whose tokens are context only
(no loss). The fingerprint names exactly what was read (files with sizes and hashes, or a tfds
name and version); it goes into the record of every model version, and each unit's content keys its
token shard. Files are streamed: read, decoded and cut into documents block by block (`streaming`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lmadapt.config import SourceConfig
from lmadapt.data import DataError, corpus_files, streaming
from lmadapt.data.corpus_files import DigestMemo, file_digest, list_files, read_bytes

__all__ = ["DigestMemo", "Document", "Documents", "SourceRead", "Unit", "decode", "file_digest", "list_files",
           "read_bytes", "read_job", "read_source", "split_documents"]


@dataclasses.dataclass(frozen=True)
class Document:
    """`text` is trained on; `prompt` (if any) precedes it as context without loss."""

    text: str
    prompt: str | None = None


class Documents:
    """One unit's documents, read as they are iterated; `replaced` (undecodable bytes replaced with U+FFFD) is
    known once they have been read through."""

    def __init__(self, docs: Iterable[Document], replaced: Callable[[], int]):
        self._docs, self._replaced = docs, replaced

    def __iter__(self) -> Iterator[Document]:
        return iter(self._docs)

    @property
    def replaced(self) -> int:
        return self._replaced()


@dataclasses.dataclass(frozen=True)
class Unit:
    """One file of a source (or a whole in-memory source): what its cached tokens are keyed by, and how to read it.

    `key` is content, not place (the file's size and sha256 and the reading rule), so a moved or copied corpus
    reuses its tokens and a changed file invalidates its own tokens only. `job`: the same read as JSON, for a
    worker process to do it (None: in memory only)."""

    key: dict[str, Any]
    where: str
    read: Callable[[], Documents]
    job: dict[str, Any] | None = None
    size: int = 0


class SourceRead:
    """A source's fingerprint, known at once; its documents when asked for, unit (file) by unit.

    The fingerprint (each file's size and hash) is streamed, so a run whose tokens are cached never holds the
    text, and `iter_documents` holds one file's text at a time: memory follows the largest file, not the
    corpus. `replaced_chars`: undecodable bytes replaced with U+FFFD, counted as the files are decoded.
    """

    def __init__(self, documents: list[Document] | None, fingerprint: dict[str, Any], replaced_chars: int = 0, *,
                 units: list[Unit] | None = None, decode_errors: str = "replace", empty: str = ""):
        self.fingerprint, self.decode_errors = fingerprint, decode_errors
        self.empty = empty or "holds no documents"  # the error when no unit holds a document
        self._documents = documents
        self._replaced: int | None = replaced_chars if documents is not None else None
        if units is None:
            docs = documents or []
            units = [Unit({"in_memory": fingerprint}, "memory", lambda: Documents(docs, lambda: replaced_chars))]
        self.units = units

    def iter_documents(self) -> Iterator[Document]:
        """Every document in order; once through, `replaced_chars` is known without keeping the text."""
        if self._documents is not None:
            yield from self._documents
            return
        replaced, found = 0, False
        for unit in self.units:
            docs = unit.read()
            for doc in docs:
                found = True
                yield doc
            replaced += docs.replaced
        if not found:
            raise DataError(self.empty)
        self._replaced = replaced

    @property
    def documents(self) -> list[Document]:
        if self._documents is None:
            self._documents = list(self.iter_documents())
        return self._documents

    @property
    def replaced_chars(self) -> int:
        if self._replaced is None:
            self.documents  # noqa: B018 - counted while decoding
        assert self._replaced is not None
        return self._replaced


DEFAULT_MAX_DOCUMENT_BYTES = 64 * 2**20  # data.max_document_bytes


def decode(raw: bytes, path: str, policy: str) -> tuple[str, int]:
    """UTF-8 text and the number of replaced characters; `policy` "fail" raises naming file and byte.

    A NUL byte is refused whatever the policy: text never holds one, while almost every binary file
    (archives, images, checkpoints, UTF-16 text) does, and replacing its undecodable bytes would train on noise.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if policy == "fail":
            raise DataError(f"{path}: not UTF-8 at byte {e.start} (set data.decode_errors=replace to replace and "
                            f"count such bytes)") from None
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def split_documents(text: str, rule: str, max_chars: int) -> list[str]:
    """Cut one file's text into documents: whole, at blank lines, or at line ends near `max_chars` (the streaming
    cutters, given the text as one block)."""
    if rule == "file":
        return list(streaming.whole(iter([text]), None))
    if rule == "blank_line":
        return list(streaming.blank_line(iter([text]), None))
    return list(streaming.chars(iter([text]), max_chars, None))


def read_source(src: SourceConfig, decode_errors: str = "replace",
                max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, memo: DigestMemo | None = None) -> SourceRead:
    """Read every document of `src`. Errors name the source, the file and (for JSONL) the line.

    A document (a JSONL line) over `max_document_bytes` of UTF-8 is an error naming file, line and size.
    """
    what = f"source {src.name!r}"
    if src.kind == "tfds":
        return _read_tfds(src, what)
    files = list_files(src.path or "", what)
    prints = [file_digest(path, memo) for path in files]
    rule = {"kind": src.kind, **_reading_rule(src)}
    units = []
    for path, seen in zip(files, prints, strict=True):
        job = {"source": dataclasses.asdict(src), "path": path, "seen": seen, "decode_errors": decode_errors,
               "max_document_bytes": max_document_bytes}
        units.append(Unit({"bytes": seen["bytes"], "sha256": seen["sha256"], **rule}, path,
                          functools.partial(read_job, job, src), job, seen["bytes"]))
    empty = f"{what}: {src.path!r} holds no documents (all files empty)"
    return SourceRead(None, {**rule, "files": prints}, units=units, decode_errors=decode_errors, empty=empty)


def read_job(job: dict[str, Any], src: SourceConfig | None = None, block: int = streaming.BLOCK) -> Documents:
    """One file's documents, from a unit's `job` (what a worker process is sent), streamed: read, hashed against
    the fingerprint, decoded and cut into documents block by block (`lmadapt.data.streaming`)."""
    if src is None:
        fields = dict(job["source"])
        if fields.get("labels") is not None:
            fields["labels"] = tuple(fields["labels"])
        src = SourceConfig(**fields)
    path = job["path"]
    changed = (f"source {src.name!r}: {path} changed while it was being read (its content differs from a moment "
               f"before); run again once it is written")
    decoded: list[streaming.Decoded] = []

    def documents() -> Iterator[Document]:
        with corpus_files.open_content(path) as f:
            decoded.append(streaming.Decoded(f, path, job["decode_errors"], job["seen"], changed, block))
            try:
                yield from _cut(decoded[0], src, path, job["max_document_bytes"], job["seen"]["bytes"])
            except DataError:
                decoded[0].drain()  # what the whole file would have said first (changed, binary) is said first
                raise

    return Documents(documents(), lambda: decoded[0].replaced if decoded else 0)


def _cut(text: Iterable[str], src: SourceConfig, path: str, limit: int, size: int) -> Iterator[Document]:
    """Documents from a file's text blocks, by the source's rule."""
    if src.kind == "jsonl":
        check = streaming.Limit(limit, path, "line")
        for n, line in streaming.lines(iter(text), check):
            if doc := _jsonl_record(line, f"{path}:{n}", src, check, n):
                yield doc
        return
    bounded = streaming.Limit(limit, path) if size > limit else None  # else no document can be over it
    blocks = iter(text)
    if src.documents == "file":
        found = streaming.whole(blocks, bounded)
    elif src.documents == "blank_line":
        found = streaming.blank_line(blocks, bounded)
    else:
        found = streaming.chars(blocks, src.max_chars, bounded)
    for doc in found:
        yield Document(doc)


def _reading_rule(src: SourceConfig) -> dict[str, Any]:
    # The settings that change which documents come out of the same files (part of the cache key).
    if src.kind == "text":
        return {"documents": src.documents, "max_chars": src.max_chars}
    rule = {"format": src.format}
    if src.format == "text":
        rule["text_field"] = src.text_field
    elif src.format == "prompt_completion":
        rule.update(prompt_field=src.prompt_field, completion_field=src.completion_field)
    else:
        # labels as a list: the fingerprint is compared with the JSON one a checkpoint saved
        rule.update(text_field=src.text_field, label_field=src.label_field,
                    labels=None if src.labels is None else list(src.labels), template=src.template)
    return rule


def _jsonl_record(line: str, where: str, src: SourceConfig, limit: streaming.Limit, n: int) -> Document | None:
    """The document of one JSONL line (None for a blank line)."""
    # JSONL records end at "\n" only: str.splitlines() would also cut at U+2028, U+0085, \v ..., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings. A "\r" before "\n" is JSON whitespace.
    if not line.strip():
        return None
    if limit.over(line):  # checked before parsing: json.loads would hold it several times over
        limit(len(line.encode("utf-8", errors="surrogatepass")), n)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if src.format == "text":
        return Document(_field(record, src.text_field, where))
    if src.format == "prompt_completion":
        return Document(_field(record, src.completion_field, where), prompt=_field(record, src.prompt_field, where))
    label = record.get(src.label_field)
    labels = list(src.labels or ())  # shown as the list the config wrote
    if str(label) not in labels:
        raise DataError(f"{where}: label {label!r} is not in the label set {labels} of source {src.name!r}")
    prompt = src.template.replace("{text}", _field(record, src.text_field, where))
    return Document(" " + str(label), prompt=prompt)


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: no field {name!r} (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
    return value


TFDS_UNIT_RECORDS = 65536  # records of an ArrayRecord dataset per unit: its token shard, its reader share


def _read_tfds(src: SourceConfig, what: str) -> SourceRead:
    """A tfds source: an ArrayRecord dataset in units of TFDS_UNIT_RECORDS records, each read when tokenized
    (a cached one never); a dataset without random access (tfrecord) read whole, as one unit."""
    from lmadapt.data.tfds_source import open_tfds_texts, read_tfds_texts  # tfds is slow to import; when used

    empty = f"{what}: tfds {src.dataset!r} split {src.split!r} holds no non-empty {src.feature!r} texts"
    try:
        lazy = open_tfds_texts(src.dataset or "", src.split, src.feature, src.data_dir)
        if lazy is None:
            texts, fingerprint = read_tfds_texts(src.dataset or "", src.split, src.feature, src.data_dir)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    if lazy is None:
        docs = [Document(t) for t in texts if t.strip()]
        if not docs:
            raise DataError(empty)
        return SourceRead(docs, fingerprint)
    n, fingerprint, read = lazy

    def records(start: int, stop: int) -> Documents:
        def docs() -> Iterator[Document]:
            try:
                texts = read(start, stop)
            except DataError as e:
                raise DataError(f"{what}: {e}") from None
            return (Document(t) for t in texts if t.strip())
        return Documents(docs(), lambda: 0)

    units = [Unit({"tfds": fingerprint, "records": [lo, min(n, lo + TFDS_UNIT_RECORDS)]},
                  f"{src.dataset} records {lo}-{min(n, lo + TFDS_UNIT_RECORDS)}",
                  functools.partial(records, lo, min(n, lo + TFDS_UNIT_RECORDS)))
             for lo in range(0, n, TFDS_UNIT_RECORDS)]
    return SourceRead(None, fingerprint, units=units, empty=empty)
