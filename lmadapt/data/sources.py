"""Data sources: local text, JSONL and tensorflow-datasets, read into documents with a fingerprint.

A document is text to train on, optionally with a prompt before it whose tokens are context only
(no loss). The fingerprint names exactly what was read (files with sizes and hashes, or a tfds
name and version); it keys the token cache and goes into the record of every model version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from lmadapt.config import SourceConfig
from lmadapt.data import DataError
from lmadapt.files.paths import Found, dir_problem, file_problem, open_regular, walk_files


@dataclasses.dataclass(frozen=True)
class Document:
    """`text` is trained on; `prompt` (if any) precedes it as context without loss."""

    text: str
    prompt: str | None = None


class SourceRead:
    """A source's fingerprint, known at once; its documents when asked for, file by file.

    The fingerprint (each file's size and hash) is streamed, so a run whose tokens are cached never holds the
    text, and `iter_documents` holds one file's text at a time: memory follows the largest file, not the
    corpus. `replaced_chars`: undecodable bytes replaced with U+FFFD, counted as the files are decoded.
    """

    def __init__(self, documents: list[Document] | None, fingerprint: dict[str, Any], replaced_chars: int = 0, *,
                 files: Callable[[], Iterator[tuple[list[Document], int]]] | None = None,
                 decode_errors: str = "replace"):
        self.fingerprint, self.decode_errors = fingerprint, decode_errors
        self._documents, self._files = documents, files
        self._replaced: int | None = replaced_chars if documents is not None else None

    @property
    def loaded(self) -> bool:
        return self._documents is not None

    def iter_documents(self) -> Iterator[Document]:
        """Every document in order; once through, `replaced_chars` is known without keeping the text."""
        if self._documents is not None:
            yield from self._documents
            return
        assert self._files is not None
        replaced = 0
        for docs, bad in self._files():
            replaced += bad
            yield from docs
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


def list_files(pattern: str, what: str) -> list[str]:
    """Files named by a path, a folder (recursively, sorted) or a glob; an error if there are none.

    Each real file is listed once (the first path to it, in sorted order): a second symlink to a file, or a
    symlink loop a folder walk or a `**` glob would go round, must not read the same text into both the train
    and the held-out split. A pipe, device or socket among the matches is refused by name, never opened.
    """
    # `{stdlib}`: the running Python's standard library, a code corpus present on every machine.
    expanded = os.path.expanduser(pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"]))
    if dir_problem(expanded) is None:
        found = [f for f in _walk(expanded, what) if not os.path.basename(f.path).startswith(".")]
    elif glob.has_magic(expanded) and not os.path.lexists(expanded):
        found = _glob(expanded, what)
    elif (problem := file_problem(expanded)) is None:
        found = [Found(expanded, os.path.realpath(expanded), None)]
    elif problem == "not found":
        raise DataError(f"{what}: path {pattern!r} not found")
    else:
        raise DataError(f"{what}: path {pattern!r} {problem.replace('regular file', 'regular file or folder')}")
    files, real = [], set()
    for f in sorted(found):
        if f.problem is not None:
            raise DataError(f"{what}: {pattern!r} matches {f.path}, which {f.problem}")
        if f.real not in real:
            real.add(f.real)
            files.append(f.path)
    if not files:
        raise DataError(f"{what}: {pattern!r} matches no files")
    return files


def _walk(folder: str, what: str, hidden_folders: bool = True) -> list[Found]:
    try:
        return list(walk_files(folder, hidden_folders))
    except OSError as e:
        raise DataError(f"{what}: cannot list folder {e.filename or folder} ({e.strerror})") from None


def _glob(pattern: str, what: str) -> list[Found]:
    """Every non-directory a glob matches. A `**` pattern is matched on a walk of its fixed leading folder that
    enters each real folder once: glob.glob follows symlinked folders, so a loop would repeat every file below
    it dozens of times (and two loops, exponentially many)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return [Found(p, os.path.realpath(p), file_problem(p)) for p in glob.glob(pattern)
                if dir_problem(p) is not None]
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "")
    if dir_problem(base or ".") is not None:
        return []
    # Paths relative to base are matched; with no fixed folder, they are also what is listed (as glob.glob).
    start, rest = len(os.path.join(base or ".", "")), parts[fixed:]
    hidden = any(part.startswith(".") for part in rest)  # else `*` and `**` never enter a ".*" folder
    found = [f if base else f._replace(path=f.path[start:]) for f in _walk(base or ".", what, hidden)]
    return [f for f in found if _glob_match(f.path[start if base else 0:].split(os.sep), rest)]


def _glob_match(names: list[str], parts: list[str]) -> bool:
    """Whether path components `names` match pattern components `parts` as glob.glob would: `*`, `?`, `[...]`
    within one name, `**` for any number of folders, and no name starting with "." unless its part does."""
    if not parts:
        return not names
    if parts[-1] != "**" and not (names and fnmatch.fnmatchcase(names[-1], parts[-1])):
        return False  # most names fail on the last part: checked first, it saves the search
    if parts[0] == "**":
        return any(_glob_match(names[k:], parts[1:]) for k in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:k]))
    return (bool(names) and (parts[0].startswith(".") or not names[0].startswith("."))
            and fnmatch.fnmatchcase(names[0], parts[0]) and _glob_match(names[1:], parts[1:]))


@contextlib.contextmanager
def _content(path: str) -> Iterator[BinaryIO]:
    """The (decompressed) content of a plain, .gz or .xz file; a pipe, device or folder is refused unopened."""
    with open_regular(path, DataError) as raw:
        try:
            if path.endswith((".xz", ".gz")):
                with (lzma.open(raw, "rb") if path.endswith(".xz") else gzip.open(raw, "rb")) as f:
                    yield f
            else:
                yield raw
        except (OSError, lzma.LZMAError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def read_bytes(path: str) -> bytes:
    """Raw bytes of a plain, .gz or .xz file; a pipe, device or folder is refused without being opened."""
    with _content(path) as f:
        return f.read()


def file_digest(path: str) -> dict[str, Any]:
    """A file's path, content size and sha256, streamed in 1 MiB pieces (memory independent of its size)."""
    digest, size = hashlib.sha256(), 0
    with _content(path) as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    return {"path": os.path.abspath(path), "bytes": size, "sha256": digest.hexdigest()}


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
    """Cut one file's text into documents: whole, at blank lines, or at line ends near `max_chars`."""
    if rule == "file":
        return [text] if text.strip() else []
    if rule == "blank_line":
        return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end  # a line longer than max_chars is cut mid-line
        chunk = text[start:end]
        if chunk.strip():
            docs.append(chunk)
        start = end
    return docs


def read_source(src: SourceConfig, decode_errors: str = "replace",
                max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> SourceRead:
    """Read every document of `src`. Errors name the source, the file and (for JSONL) the line.

    A document (a JSONL line) over `max_document_bytes` of UTF-8 is an error naming file, line and size.
    """
    what = f"source {src.name!r}"
    if src.kind == "tfds":
        return _read_tfds(src, what)
    files = list_files(src.path or "", what)
    prints = [file_digest(path) for path in files]
    fingerprint = {"kind": src.kind, "files": prints, **_reading_rule(src)}
    stream = functools.partial(_file_documents, src, what, files, prints, decode_errors, max_document_bytes)
    return SourceRead(None, fingerprint, files=stream, decode_errors=decode_errors)


def _file_documents(src: SourceConfig, what: str, files: list[str], prints: list[dict[str, Any]],
                    decode_errors: str, max_document_bytes: int) -> Iterator[tuple[list[Document], int]]:
    """Each file's documents and replaced-byte count, in order; an error if no file holds a document."""
    found_any = False
    for path, seen in zip(files, prints, strict=True):
        raw = read_bytes(path)
        if len(raw) != seen["bytes"] or hashlib.sha256(raw).hexdigest() != seen["sha256"]:
            raise DataError(f"{what}: {path} changed while it was being read (its content differs from a moment "
                            f"before); run again once it is written")
        text, bad = decode(raw, path, decode_errors)
        size = len(raw)
        del raw  # one file's text in memory at a time, not its bytes too
        if src.kind == "text":
            found = split_documents(text, src.documents, src.max_chars)
            if size > max_document_bytes:  # else no document can be over the limit: skip the count
                _check_sizes(found, text, path, max_document_bytes)
            docs = [Document(d) for d in found]
        else:
            docs = _jsonl_documents(text, path, src, max_document_bytes)
        del text
        found_any = found_any or bool(docs)
        yield docs, bad
    if not found_any:
        raise DataError(f"{what}: {src.path!r} holds no documents (all files empty)")


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


def _too_big(text: str, limit: int) -> int:
    """The UTF-8 size of `text` when it is over `limit` bytes, else 0 (encoding only when it could be)."""
    if 4 * len(text) <= limit:  # at most 4 bytes a character
        return 0
    size = len(text.encode("utf-8", errors="surrogatepass"))
    return size if size > limit else 0


def _check_sizes(docs: list[str], text: str, path: str, limit: int) -> None:
    for d in docs:
        if size := _too_big(d, limit):
            start = text.find(d[:64])
            line = text.count("\n", 0, start) + 1 if start >= 0 else "?"
            raise DataError(f"{path}:{line}: a document of {size:,} bytes, over data.max_document_bytes={limit:,} "
                            f"(raise it if the file really is one long document)")


def _jsonl_documents(text: str, path: str, src: SourceConfig, limit: int) -> list[Document]:
    docs = []
    # JSONL records end at "\n" only: str.splitlines() would also cut at U+2028, U+0085, \v ..., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings. A "\r" before "\n" is JSON whitespace.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if size := _too_big(line, limit):  # checked before parsing: json.loads would hold it several times over
            raise DataError(f"{where}: a line of {size:,} bytes, over data.max_document_bytes={limit:,}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if src.format == "text":
            docs.append(Document(_field(record, src.text_field, where)))
        elif src.format == "prompt_completion":
            docs.append(Document(_field(record, src.completion_field, where),
                                 prompt=_field(record, src.prompt_field, where)))
        else:
            label = record.get(src.label_field)
            labels = list(src.labels or ())  # shown as the list the config wrote
            if str(label) not in labels:
                raise DataError(f"{where}: label {label!r} is not in the label set {labels} of source {src.name!r}")
            prompt = src.template.replace("{text}", _field(record, src.text_field, where))
            docs.append(Document(" " + str(label), prompt=prompt))
    return docs


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: no field {name!r} (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
    return value


def _read_tfds(src: SourceConfig, what: str) -> SourceRead:
    from lmadapt.data.tfds_source import read_tfds_texts  # tfds is slow to import; only when used

    try:
        texts, fingerprint = read_tfds_texts(src.dataset or "", src.split, src.feature, src.data_dir)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    docs = [Document(t) for t in texts if t.strip()]
    if not docs:
        raise DataError(f"{what}: tfds {src.dataset!r} split {src.split!r} holds no non-empty {src.feature!r} texts")
    return SourceRead(docs, fingerprint)
