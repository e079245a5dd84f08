"""Files cut into documents as they stream in blocks give what cutting the whole decoded file gives: the same
documents, replaced-byte counts and errors (the reader of before issue 20 is the oracle here)."""

import hashlib
import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from lmadapt.config import SourceConfig
from lmadapt.data import DataError, corpus_files, sources

FRAGMENTS = [b"a", b"bc ", b" ", b"\n", b"\n", b"\n\n", b" \n", b"\n \n", b"\t", b"\r\n", "é".encode(),
             "\u2028".encode(), "\x85".encode(), "\xa0".encode(), b"\x1c", b"\xff", b"\xe2\x82", "\ufffd".encode(),
             b"\xef\xbf", "€".encode()]


def reference_split(text, rule, max_chars):
    """How a whole file's text was cut into documents before streaming (issue 20): the oracle."""
    if rule == "file":
        return [text] if text.strip() else []
    if rule == "blank_line":
        return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        if text[start:end].strip():
            docs.append(text[start:end])
        start = end
    return docs


def whole_file(raw, path, src, policy, limit):
    """The documents and replaced count of the whole-file reader (decode it all, then cut it)."""
    text, bad = sources.decode(raw, path, policy)
    if src.kind == "jsonl":
        check = sources.streaming.Limit(limit, path, "line")
        docs = [d for n, line in enumerate(text.split("\n"), start=1)
                if (d := sources._jsonl_record(line, f"{path}:{n}", src, check, n))]
        return docs, bad
    found = reference_split(text, src.documents, src.max_chars)
    if len(raw) > limit:
        for d in found:
            if len(d.encode("utf-8", errors="surrogatepass")) > limit:
                size = len(d.encode("utf-8", errors="surrogatepass"))
                raise DataError(f"{path}:?: a document of {size:,} bytes, over data.max_document_bytes={limit:,} "
                                f"(raise it if the file really is one long document)")
    return [sources.Document(d) for d in found], bad


def streamed(raw, path, src, policy, limit, block):
    seen = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    job = {"path": path, "seen": seen, "decode_errors": policy, "max_document_bytes": limit}
    real = corpus_files.open_content
    corpus_files.open_content = lambda p: _opened(raw)
    try:
        docs = sources.read_job(job, src, block=block)
        return list(docs), docs.replaced
    finally:
        corpus_files.open_content = real


class _opened:
    def __init__(self, raw):
        self.f = io.BytesIO(raw)

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        return False


def outcome(fn, *args):
    try:
        return fn(*args)
    except DataError as e:  # where a too-long document starts is not compared: the oracle only guessed it
        return re.sub(r":(\d+|\?): a document", ":L: a document", str(e))


RULES = st.sampled_from([("file", 0), ("blank_line", 0), ("chars", 1), ("chars", 3), ("chars", 17)])


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS + [b"\0"]), max_size=60), rule=RULES, block=st.integers(1, 9),
       policy=st.sampled_from(["replace", "fail"]), limit=st.sampled_from([4, 11, 40, 10_000]))
def test_text_documents_stream_as_the_whole_file_cuts_them(parts, rule, block, policy, limit):
    raw = b"".join(parts)
    src = SourceConfig(name="x", documents=rule[0], max_chars=max(rule[1], 1))
    assert outcome(streamed, raw, "f.txt", src, policy, limit, block) == outcome(whole_file, raw, "f.txt", src,
                                                                                 policy, limit)


JSON_LINES = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in ("a", "é\u2028b", "x" * 30, " ")] + [
    b"", b"  ", b"{bad", b"[1]", b'{"other": 1}', b"\r", "\u2028".encode(), b"\xff"]


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.sampled_from(JSON_LINES), max_size=12), block=st.integers(1, 9),
       policy=st.sampled_from(["replace", "fail"]), limit=st.sampled_from([6, 25, 10_000]))
def test_jsonl_records_stream_as_the_whole_file_reads_them(lines, block, policy, limit):
    raw = b"\n".join(lines)
    src = SourceConfig(name="x", kind="jsonl")
    assert outcome(streamed, raw, "d.jsonl", src, policy, limit, block) == outcome(whole_file, raw, "d.jsonl", src,
                                                                                   policy, limit)


TRICKY = [b"a\n\n \n b", b"\n\na\n\n\nb\n", b"x \n\t\n y\n \n", b"a\r\n\r\nb",
          "é\u2028\n\u2028\nb\x85\n\xa0\n".encode(), b"one line\nand another\nand\n\n",
          b"\xef\xbf\xbd\xff\xe2\x82 \n\n\xe2\x82\xac"]


def test_every_block_boundary_of_tricky_texts():
    # What random fragments seldom hit: a separator's whitespace cut by a block end, at every place.
    for raw in TRICKY:
        for rule, max_chars in (("blank_line", 0), ("chars", 4), ("file", 0)):
            src = SourceConfig(name="x", documents=rule, max_chars=max(max_chars, 1))
            want = outcome(whole_file, raw, "f.txt", src, "replace", 5)
            for block in range(1, len(raw) + 1):
                assert outcome(streamed, raw, "f.txt", src, "replace", 5, block) == want, (raw, rule, block)
