"""Documents cut from a file as it is read, block by block: the same documents, replaced-byte counts and errors
as decoding and cutting the whole file (`sources.decode`, `sources.split_documents`, the JSONL reader), while
holding one block and the document being cut, so memory follows the largest document, not the largest file.

The equivalence is what the property tests check, over random bytes and block sizes. Where it needs care:
a blank-line separator (`\\n\\s*\\n`, greedy) is taken only when the whitespace after it ends inside the block;
a `chars` document is cut only once `max_chars` more characters are known; an error is raised once the rest of
the file has been read, so that what the whole-file reader would have said first (the file changed, a NUL byte,
a strict-policy decode error) is said first here too.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterator
from typing import BinaryIO

from lmadapt.data import DataError

BLOCK = 1 << 20
_SEPARATOR = re.compile(r"\n\s*\n")
_FFFD = "\ufffd".encode()


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


class Decoded:
    """The UTF-8 text of `f`, block by block, checked as `sources.decode` checks a whole file (NUL refused;
    undecodable bytes replaced and counted, or refused under policy "fail"), hashed as it goes against `seen`
    (its size and sha256 of a moment before; `changed` is the error when they differ). A problem stops the text
    and is raised once the file is read, the changed file first, then a NUL byte, then a decode error: the
    order the whole-file reader finds them in."""

    def __init__(self, f: BinaryIO, path: str, policy: str, seen: dict, changed: str, block: int = BLOCK):
        self.f, self.path, self.policy, self.seen, self.changed, self.block = f, path, policy, seen, changed, block
        self.replaced, self.size, self._hash = 0, 0, hashlib.sha256()
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict" if policy == "fail" else "replace")
        self._tail = b""  # the last 2 bytes: a genuine U+FFFD may span two blocks
        self._nul: int | None = None
        self._bad: int | None = None  # offset of the first undecodable byte (policy "fail")

    def __iter__(self) -> Iterator[str]:
        while piece := self.f.read(self.block):
            if text := self._feed(piece):
                yield text
        if text := self._feed(b"", final=True):
            yield text
        self._raise()

    def _feed(self, piece: bytes, final: bool = False) -> str:
        start = self.size
        self._hash.update(piece)
        self.size += len(piece)
        nul = piece.find(b"\0")
        if nul >= 0 and self._nul is None:
            self._nul = start + nul
        if self._nul is not None or self._bad is not None:
            return ""  # the file is refused: read on only for what is said first
        pending = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(piece, final)
        except UnicodeDecodeError as e:
            self._bad = start - pending + e.start
            return ""
        genuine = (self._tail + piece).count(_FFFD)
        self._tail = (self._tail + piece)[-2:]
        self.replaced += text.count("\ufffd") - genuine
        return text

    def _raise(self) -> None:
        if self.size != self.seen["bytes"] or self._hash.hexdigest() != self.seen["sha256"]:
            raise DataError(self.changed)
        if self._nul is not None:
            raise DataError(f"{self.path}: looks like a binary file (NUL byte at offset {self._nul}); expected "
                            f"UTF-8 text")
        if self._bad is not None:
            raise DataError(f"{self.path}: not UTF-8 at byte {self._bad} (set data.decode_errors=replace to replace "
                            f"and count such bytes)")

    def drain(self) -> None:
        """Read the rest, raising what the whole-file reader would have said before the caller's error."""
        for _ in self:
            pass


class Limit:
    """data.max_document_bytes for one file: `over(text)` tells whether a text is over it; calling it raises
    the error naming the file, line and the document's size (`noun`: "document", or "line" for JSONL)."""

    def __init__(self, limit: int, path: str, noun: str = "document"):
        self.limit, self.path, self.noun = limit, path, noun

    def over(self, text: str) -> bool:
        return 4 * len(text) > self.limit and _utf8(text) > self.limit

    def __call__(self, size: int, line: int) -> None:
        hint = " (raise it if the file really is one long document)" if self.noun == "document" else ""
        raise DataError(f"{self.path}:{line}: a {self.noun} of {size:,} bytes, over "
                        f"data.max_document_bytes={self.limit:,}{hint}")


def blank_line(blocks: Iterator[str], limit: Limit | None) -> Iterator[str]:
    """Documents separated by blank lines, as `split_documents(text, "blank_line", _)`; a document over `limit`
    is counted to its end (not kept) and refused."""
    carry, line = "", 1  # the document being cut, and the line it starts on
    dropped: int | None = None  # bytes of an over-limit document let go so far
    for block in blocks:
        buf = carry + block
        last = 0
        # A separator whose whitespace ends in this buffer; none starts before the carry's trailing whitespace
        # (it would have been taken already), so a long document is not searched again block after block.
        for m in _SEPARATOR.finditer(buf, len(carry.rstrip()), len(buf.rstrip())):
            piece = buf[last:m.start()]
            if dropped is not None:
                limit(dropped + _utf8(piece), line)  # type: ignore[misc]
            if piece.strip():
                doc = piece.strip("\n")
                if limit is not None and limit.over(doc):
                    limit(_utf8(doc), line + len(piece) - len(piece.lstrip("\n")))
                yield doc
            line += buf.count("\n", last, m.end())
            last = m.end()
        carry = buf[last:]
        if dropped is None and limit is not None and limit.over(carry.lstrip("\n").rstrip()):  # the least it holds
            dropped = 0
            line += len(carry) - len(carry.lstrip("\n"))  # the document starts after them (file start only)
            carry = carry.lstrip("\n")
        if dropped is not None:  # keep only the whitespace a separator may start with
            head = carry.rstrip()
            dropped += _utf8(head)
            carry = carry[len(head):]
    if dropped is not None:
        limit(dropped + _utf8(_SEPARATOR.split(carry)[0].rstrip("\n")), line)  # type: ignore[misc]
    for piece in _SEPARATOR.split(carry):
        if piece.strip():
            doc = piece.strip("\n")
            if limit is not None and limit.over(doc):
                limit(_utf8(doc), line + len(piece) - len(piece.lstrip("\n")))
            yield doc
        line += piece.count("\n")  # not exact past here; only a refused document's line is reported


def chars(blocks: Iterator[str], max_chars: int, limit: Limit | None) -> Iterator[str]:
    """Documents of about `max_chars` cut at line ends, as `split_documents(text, "chars", max_chars)`."""
    buf, line, final = "", 1, False
    blocks = iter(blocks)
    while not final:
        block = next(blocks, None)
        final = block is None
        buf += block or ""
        start = 0
        while start < len(buf) and (final or start + max_chars < len(buf)):  # else `end < len(text)` is unknown
            end = min(start + max_chars, len(buf))
            if end < len(buf):
                cut = buf.rfind("\n", start, end)
                end = cut + 1 if cut > start else end  # a line longer than max_chars is cut mid-line
            chunk = buf[start:end]
            if chunk.strip():
                if limit is not None and limit.over(chunk):
                    limit(_utf8(chunk), line)
                yield chunk
            line += buf.count("\n", start, end)
            start = end
        buf = buf[start:]


def whole(blocks: Iterator[str], limit: Limit | None) -> Iterator[str]:
    """The file as one document (if it is not blank); over `limit`, its size is counted, not kept."""
    parts: list[str] = []
    size, kept, blank = 0, True, True
    for block in blocks:
        size += _utf8(block)
        blank = blank and not block.strip()
        if kept:
            parts.append(block)
            if limit is not None and size > limit.limit and not blank:
                kept, parts = False, []
    if not kept and not blank:
        limit(size, 1)  # type: ignore[misc]
    text = "".join(parts)
    if text.strip():
        yield text


def lines(blocks: Iterator[str], limit: Limit | None) -> Iterator[tuple[int, str]]:
    """(line number, line) of JSONL text, split at "\n" only (as the whole-file reader). A line that grows over
    `limit` before its end is counted to its end, not kept, and refused unless it is blank (as a blank line is
    skipped whatever its length); a complete line is the caller's to check."""
    carry, n = "", 1
    dropped: int | None = None
    blank = True
    for block in blocks:
        buf = carry + block
        parts = buf.split("\n")
        carry = parts.pop()
        for part in parts:
            if dropped is not None:
                if not (blank and not part.strip()):
                    limit(dropped + _utf8(part), n)  # type: ignore[misc]
                dropped, blank, part = None, True, ""
            yield n, part
            n += 1
        if dropped is None and limit is not None and limit.over(carry):
            dropped = 0
        if dropped is not None:
            dropped += _utf8(carry)
            blank = blank and not carry.strip()
            carry = ""
    if dropped is not None and not (blank and not carry.strip()):
        limit(dropped + _utf8(carry), n)  # type: ignore[misc]
    yield n, carry
