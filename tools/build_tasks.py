"""Build the example capability-task suite (configs/eval/tasks.yaml) from the bundled data: small JSONL files.

    python tools/build_tasks.py                 # writes data/tasks/*.jsonl; refuses to change a different file
    python tools/build_tasks.py --check         # exit 1 when a shipped file differs from what this builds
    python tools/build_tasks.py --force         # overwrite files that differ
    python tools/build_tasks.py --out DIR       # somewhere else

Tasks (formats of lmadapt.eval.tasks), each with a `<name>.fewshot.jsonl` train split for few-shot prompts:

    shakespeare_cloze      generate         a Shakespeare passage and the start of its next line; the answer
                                            is that line's last word (with its punctuation)
    shakespeare_next_line  multiple_choice  a Shakespeare passage and the first word of its next line; which
                                            of 4 line endings is the real one (3 from other passages)
    python_docs_next_line  multiple_choice  the same on prose lines of the Python documentation
    debian_section         multiple_choice  a Debian package description; which of 4 archive sections is its
                                            own (3 other sections drawn per example)

The quickstart trains on shakespeare, then on python_docs: the Shakespeare tasks show what the update forgot,
the Python one what it gained. Their examples come from the quickstart's held-out documents of those sources
(cut and drawn as lmadapt.data does with the quickstart's settings), and none asks for a line that a training
document also holds, so neither version trained on them; the few-shot splits come from training documents.
Debian examples are descriptions that occur once in the file, 20 per section (5 more each for few-shot).

Every choice is deterministic: items are ordered by sha256 of a fixed seed and their text (not `random`,
whose algorithms may change across Python versions), so the same data gives byte-identical files. For every
example `context + " " + answer` (`prompt + " " + answers[0]`) is the original text verbatim. Files are UTF-8
JSON lines (non-ASCII kept; U+0085, U+2028 and U+2029 escaped so no line splitter cuts a record), written
atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEED = "lmadapt-tasks-v1"
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
DEBIAN = os.path.join(ROOT, "data", "debian_sections.jsonl.xz")
MAX_CONTEXT_CHARS = 200  # a passage and its asked-for line: with the answer, < 256 tokens of the byte tokenizer
# Cloze prompts in a narrow band of lengths: generation compiles once per prompt length in tokens, so a
# narrow band means fewer compiles (and every prompt has a few lines of context).
MIN_CLOZE_PROMPT_CHARS = 130
CHOICES = 4
COUNTS = {  # (examples, few-shot examples) per task
    "shakespeare_cloze": (200, 32),
    "shakespeare_next_line": (150, 32),
    "python_docs_next_line": (120, 24),
    "debian_section": (200, 50),
}
DEBIAN_PER_SECTION = (20, 5)


class BuildError(RuntimeError):
    """The data does not give the tasks (too few candidates), or an output file would be silently changed."""


# ------------------------------------------------------------------------------------------------------------
# Deterministic choice
# ------------------------------------------------------------------------------------------------------------


def _rank(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in (SEED, *parts)).encode("utf-8")).hexdigest()


def _pick(items: Sequence[Any], n: int, salt: str, key: Callable[[Any], str]) -> list[Any]:
    """The n items first in sha256 order of (salt, key(item)); keys must be unique."""
    return sorted(items, key=lambda x: _rank(salt, key(x)))[:n]


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


# ------------------------------------------------------------------------------------------------------------
# Source text: the quickstart's held-out and training documents
# ------------------------------------------------------------------------------------------------------------


def quickstart_documents(config: str = QUICKSTART) -> dict[str, tuple[list[str], list[str]]]:
    """{source name: (training documents, held-out documents)} of every source the quickstart's stages train on,
    cut and split exactly as training and the report's held-out evaluation do."""
    from lmadapt.config import load_config
    from lmadapt.data.pipeline import held_out_split
    from lmadapt.data.sources import read_source

    top = load_config(config)
    sources = {}
    for stage in top.stages or ():
        for src in load_config(config, list(stage.overrides)).data.sources:
            sources.setdefault(src.name, src)
    out = {}
    for name, src in sources.items():
        path = src.path if os.path.isabs(src.path) else os.path.join(ROOT, src.path)
        read = read_source(dataclasses.replace(src, path=path), "fail")
        train, val = held_out_split(read, top.data.val_fraction, top.data.seed, name)
        out[name] = ([d.text for d in train], [d.text for d in val])
    return out


class Split(NamedTuple):
    """What a text task draws from: held-out documents (examples), training ones (few-shot examples) and
    every line training saw (case and spacing aside), which no example may ask for."""

    val: list[str]
    fewshot: list[str]
    trained: frozenset[str]


def split_for_tasks(train: Sequence[str], val: Sequence[str], name: str) -> Split:
    """A sample of the training documents (as many as are held out) is enough for few-shot examples."""
    picked = sorted(_pick(range(len(train)), len(val), f"{name}/fewshot-documents", str))
    return Split(list(val), [train[i] for i in picked],
                 frozenset(_norm(line) for doc in train for line in doc.split("\n") if line.strip()))


def blocks(docs: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(block id, lines) of every paragraph (lines between blank lines) of every document, in order."""
    for d, doc in enumerate(docs):
        block: list[str] = []
        for n, line in enumerate(doc.split("\n") + [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield f"{d}:{n}", block
                block = []


def _speech_blocks(docs: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Shakespeare blocks without a stage direction (one in brackets may run over several lines)."""
    for bid, lines in blocks(docs):
        if not any("[" in line or "]" in line for line in lines):
            yield bid, lines


def _context(lines: Sequence[str], j: int) -> list[str] | None:
    """Up to 3 lines before line j of a block, fewest dropped from the front to fit MAX_CONTEXT_CHARS; None
    when not even the line just before fits."""
    ctx = list(lines[max(0, j - 3):j])
    while ctx and sum(len(c) + 1 for c in ctx) + len(lines[j]) > MAX_CONTEXT_CHARS:
        ctx.pop(0)
    return ctx or None


# A line whose last word (letters, inner apostrophes) ends it with punctuation: the cloze's answer.
CLOZE_LINE = re.compile(r"^(?P<start>\s*\S.*\S) (?P<answer>[A-Za-z](?:[A-Za-z']*[A-Za-z])?[.,;:!?]{1,3})$")
# A line's first word and the rest (one space between, no trailing space): the next-line task's split.
SPLIT_LINE = re.compile(r"^(?P<start>\s*\S+) (?P<rest>\S(?:.*\S)?)$")


def shakespeare_line(line: str) -> bool:
    """Spoken text (in a block without stage directions): not a speaker tag or heading; 4 to 14 words."""
    return any(c.islower() for c in line) and 4 <= len(line.split()) <= 14


def python_docs_line(line: str) -> bool:
    """Prose of the Python docs: 6+ words, mostly letters, not markup (directives, tables, rules, prompts)."""
    s = line.strip()
    if s.startswith(("..", "+", "|", "=", "-", ">>>", "...", "#", ":", "*")) or len(s.split()) < 6:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters >= 0.85 * len(s) and not s.endswith("::")


def _prose_blocks(docs: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Python docs blocks that are not code: not after a `::` line, no interactive prompt."""
    after_literal = False
    for bid, lines in blocks(docs):
        code = after_literal or any(line.lstrip().startswith(">>>") for line in lines)
        after_literal = lines[-1].rstrip().endswith("::")
        if not code:
            yield bid, lines


def cloze_candidates(docs: Sequence[str]) -> list[dict[str, Any]]:
    """Lines ending in a word and punctuation, with MIN_CLOZE_PROMPT_CHARS..MAX_CONTEXT_CHARS of passage."""
    out = []
    for bid, lines in _speech_blocks(docs):
        for j in range(1, len(lines)):
            m = CLOZE_LINE.match(lines[j])
            if m and shakespeare_line(lines[j]) and len(m["start"].split()) >= 3 and (ctx := _context(lines, j)):
                prompt = "\n".join([*ctx, m["start"]])
                if len(prompt) >= MIN_CLOZE_PROMPT_CHARS:
                    out.append({"block": bid, "line": lines[j], "prompt": prompt, "answers": [m["answer"]]})
    return out


def next_line_candidates(blocks_: Iterator[tuple[str, list[str]]], keep: Callable[[str], bool]
                         ) -> list[dict[str, Any]]:
    out = []
    for bid, lines in blocks_:
        for j in range(1, len(lines)):
            m = SPLIT_LINE.match(lines[j])
            if m and keep(lines[j]) and len(m["rest"].split()) >= 3 and (ctx := _context(lines, j)):
                out.append({"block": bid, "line": lines[j], "context": "\n".join([*ctx, m["start"]]),
                            "rest": m["rest"]})
    return out


def _unique_lines(cands: list[dict[str, Any]], avoid: set[str] = frozenset()) -> list[dict[str, Any]]:
    """One candidate per distinct line (the first), none whose line is in `avoid`."""
    seen, out = set(avoid), []
    for c in cands:
        key = _norm(c["line"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------------


def _shuffled_choices(answer: str, distractors: list[str], salt: str) -> tuple[list[str], int]:
    choices = sorted([answer, *distractors], key=lambda c: _rank(salt, "order", c))
    return choices, choices.index(answer)


def _distractors(ex: dict[str, Any], pool: list[dict[str, Any]], salt: str) -> list[str]:
    """CHOICES - 1 line endings from other passages, each within 0.6x..1.6x of the answer's length, distinct
    from the answer and each other (case and spacing aside) and not in the example's own passage."""
    n = len(ex["rest"])
    own = _norm(ex["context"])
    picked: list[str] = []
    seen = {_norm(ex["rest"])}
    for t in range(100 * CHOICES):  # pseudo-random draws (with replacement) until enough fit
        c = pool[int(_rank(salt, ex["line"], t), 16) % len(pool)]
        key = _norm(c["rest"])
        if (c["block"] != ex["block"] and 0.6 * n <= len(c["rest"]) <= 1.6 * n and key not in seen
                and key not in own):
            picked.append(c["rest"])
            seen.add(key)
            if len(picked) == CHOICES - 1:
                return picked
    raise BuildError(f"{salt}: too few distractors for {ex['line']!r}")


def _examples_and_shots(name: str, val: list[dict], fewshot: list[dict], trained: frozenset[str]
                        ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(examples, few-shot examples, and the candidate pools they came from): examples ask for no line
    training saw, few-shot examples for no line an example asks for."""
    n, k = COUNTS[name]
    val = _unique_lines(val, trained)
    examples = _pick(val, n, name, lambda c: c["line"])
    fewshot = _unique_lines(fewshot, {_norm(e["line"]) for e in examples})
    shots = _pick(fewshot, k, f"{name}/fewshot", lambda c: c["line"])
    if len(examples) < n or len(shots) < k:
        raise BuildError(f"{name}: {len(examples)} examples and {len(shots)} few-shot ones; want {n} and {k}")
    return examples, shots, val, fewshot


def build_cloze(name: str, src: Split) -> tuple[list[dict], list[dict]]:
    examples, shots, _, _ = _examples_and_shots(name, cloze_candidates(src.val), cloze_candidates(src.fewshot),
                                                src.trained)
    return ([{"prompt": e["prompt"], "answers": e["answers"]} for e in examples],
            [{"prompt": e["prompt"], "answers": e["answers"]} for e in shots])


def build_next_line(name: str, src: Split, blocks_of: Callable[[Sequence[str]], Iterator[tuple[str, list[str]]]],
                    keep: Callable[[str], bool]) -> tuple[list[dict], list[dict]]:
    """Examples and few-shot examples; each split's distractors come from its own split's lines."""
    examples, shots, val, fewshot = _examples_and_shots(
        name, next_line_candidates(blocks_of(src.val), keep), next_line_candidates(blocks_of(src.fewshot), keep),
        src.trained)

    def record(ex: dict, pool: list[dict], salt: str) -> dict:
        choices, answer = _shuffled_choices(ex["rest"], _distractors(ex, pool, salt), salt)
        return {"context": ex["context"], "choices": choices, "answer": answer}

    return [record(e, val, name) for e in examples], [record(e, fewshot, f"{name}/fewshot") for e in shots]


def debian_records(path: str = DEBIAN) -> list[dict[str, str]]:
    from lmadapt.data.sources import decode, read_bytes

    text, _ = decode(read_bytes(path), path, "fail")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def build_debian(name: str, records: Sequence[dict[str, str]]) -> tuple[list[dict], list[dict]]:
    """20 (+5 few-shot) descriptions per section, each occurring once in the file; 3 other sections each."""
    counts: dict[str, int] = {}
    for r in records:
        counts[_norm(r["text"])] = counts.get(_norm(r["text"]), 0) + 1
    sections = sorted({r["label"] for r in records})
    if len(sections) < CHOICES:
        raise BuildError(f"{name}: {len(sections)} sections; need at least {CHOICES}")
    n, k = DEBIAN_PER_SECTION
    examples, shots = [], []
    for section in sections:
        pool = [r for r in records if r["label"] == section and counts[_norm(r["text"])] == 1
                and "\n" not in r["text"] and 10 <= len(r["text"]) <= 120]
        chosen = _pick(pool, n + k, f"{name}/{section}", lambda r: r["package"])
        if len(chosen) < n + k:
            raise BuildError(f"{name}: section {section!r} has {len(pool)} usable descriptions; want {n + k}")
        examples += chosen[:n]
        shots += chosen[n:]

    def record(r: dict[str, str], salt: str) -> dict:
        others = _pick([s for s in sections if s != r["label"]], CHOICES - 1, f"{salt}/{r['package']}", str)
        choices, answer = _shuffled_choices(r["label"], others, f"{salt}/{r['package']}")
        return {"context": f"Description: {r['text']}\nSection:", "choices": choices, "answer": answer}

    # Interleave the sections in a fixed order so `max_examples` keeps them balanced-ish.
    examples = sorted(examples, key=lambda r: _rank(name, "order", r["package"]))
    shots = sorted(shots, key=lambda r: _rank(name, "fewshot-order", r["package"]))
    return [record(r, name) for r in examples], [record(r, f"{name}/fewshot") for r in shots]


def build_all(config: str = QUICKSTART, debian: str = DEBIAN) -> dict[str, list[dict]]:
    """{file name: records} of every task file."""
    docs = quickstart_documents(config)
    shakespeare = split_for_tasks(*docs["shakespeare"], "shakespeare")
    python_docs = split_for_tasks(*docs["python_docs"], "python_docs")
    built = {
        "shakespeare_cloze": build_cloze("shakespeare_cloze", shakespeare),
        "shakespeare_next_line": build_next_line("shakespeare_next_line", shakespeare, _speech_blocks,
                                                 shakespeare_line),
        "python_docs_next_line": build_next_line("python_docs_next_line", python_docs, _prose_blocks,
                                                 python_docs_line),
        "debian_section": build_debian("debian_section", debian_records(debian)),
    }
    out = {}
    for name, (examples, shots) in built.items():
        out[f"{name}.jsonl"], out[f"{name}.fewshot.jsonl"] = examples, shots
    return out


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def encode(records: Sequence[dict]) -> bytes:
    """JSON lines, UTF-8, non-ASCII kept except the characters some line splitters break at."""
    lines = []
    for r in records:
        line = json.dumps(r, ensure_ascii=False)
        for ch in ("\x85", "\u2028", "\u2029"):
            line = line.replace(ch, f"\\u{ord(ch):04x}")
        lines.append(line + "\n")
    return "".join(lines).encode("utf-8")


def write_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_files(config: str = QUICKSTART, debian: str = DEBIAN) -> dict[str, bytes]:
    return {name: encode(records) for name, records in build_all(config, debian).items()}


def _existing(path: str) -> bytes | None:
    """The bytes of a regular file (not a link) at `path`; None for anything else or nothing."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def stale(files: dict[str, bytes], out: str) -> list[str]:
    """Paths under `out` that are missing or differ from `files`."""
    return [os.path.join(out, n) for n, data in files.items() if _existing(os.path.join(out, n)) != data]


def write_files(files: dict[str, bytes], out: str, force: bool = False) -> list[str]:
    """Write every file atomically; refuse (before writing any) to change an existing different one unless
    `force`. Returns the names written (identical existing files are left alone)."""
    differ, changed = [], []
    for name, data in files.items():
        path = os.path.join(out, name)
        if os.path.lexists(path):
            old = _existing(path)
            if old is None:
                raise BuildError(f"{path}: exists and is not a regular file")
            if old == data:
                continue
            differ.append(path)
        changed.append(name)
    if differ and not force:
        raise BuildError(f"{len(differ)} file(s) exist with different contents ({', '.join(differ)}); "
                         f"pass --force to overwrite")
    os.makedirs(out, exist_ok=True)
    for name in changed:
        write_atomic(os.path.join(out, name), files[name])
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "data", "tasks"), help="folder (default data/tasks)")
    p.add_argument("--force", action="store_true", help="overwrite files whose contents differ")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file differs or is missing")
    args = p.parse_args(argv)
    files = build_files()
    if args.check:
        bad = stale(files, args.out)
        for path in bad:
            print(f"differs or missing: {path}")
        print("up to date" if not bad else f"{len(bad)} of {len(files)} file(s) out of date; run "
              f"python tools/build_tasks.py --force")
        return 1 if bad else 0
    try:
        written = write_files(files, args.out, args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, data in files.items():
        lines = data.count(b"\n")
        print(f"{'wrote' if name in written else 'same '} {os.path.join(args.out, name)}  "
              f"{lines:4d} examples  {len(data) / 1024:5.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
