"""Logit checker: does a Hugging Face checkpoint compute the same function in lmadapt as in transformers?

    report = check_hf("out/hf")                                   # DIR's own weights in both
    report = check_hf("out/hf", lineage_dir="lin", version="v3")  # a version (e.g. the one exported to DIR) vs DIR
    print("\\n".join(report.lines())); sys.exit(report.exit_code())

What is compared (candidate = lmadapt, reference = transformers):
  tokenizer   lmadapt's tokenizer vs `AutoTokenizer.from_pretrained(DIR)` (no special tokens added) on every text:
              how many texts encode differently, the first such text and its first differing position;
  logits      the same ids (lmadapt's encoding, with lmadapt's bos) through both models: max |logit difference|,
              mean KL(reference || lmadapt) per token and top-1 agreement;
  generation  greedy decode of `new_tokens` tokens with each side's KV cache from the first text's first 16 tokens:
              equal or not, and each decoded. A first difference where the reference's own top two logits are
              within `atol` is a near tie, reported and not counted as a failure.
The check fails on a logit difference above `atol` (default 1e-4 computing in float32, 0.5 in bfloat16), on any
tokenizer difference and on a generation difference. Computing in bfloat16 halves transformers' memory but hides
small errors: float32 (a bfloat16 checkpoint upcast exactly) is the precise check.
Exit codes (`exit_code`): 0 passed, 1 failed, 3 passed what could be compared but transformers/torch are not
installed (with a lineage version, it is compared with DIR as lmadapt imports it; without, nothing is). Bad input
raises `CheckError`, `HFError`, `LineageError` or `TokenizerError` with one line naming the problem (the tool
exits 2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lmadapt.hf.logit_report import CheckReport, GenerationResult, LogitResult, TokenizerResult
from lmadapt.hf.logit_sides import (
    DTYPES,
    LmadaptSide,
    Side,
    TransformersSide,
    lmadapt_from_hf,
    lmadapt_from_lineage,
    transformers_available,
)

__all__ = ["DEFAULT_ATOL", "DEFAULT_TEXTS", "CheckError", "CheckReport", "check_hf", "check_sides", "read_texts"]

# Prose, code, whitespace runs, markup, numbers and non-Latin scripts: where tokenizers (and conversions) differ.
DEFAULT_TEXTS: tuple[str, ...] = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'
    "        a, b = b, a + b\n    return a\n\n\nprint(fib(10))  # 55\n",
    "   leading spaces,\ttabs\t\tand  double  spaces   \n\n\n\nfour newlines, a CRLF\r\nand trailing blanks  \t ",
    "SELECT name, COUNT(*) AS n FROM users WHERE age >= 30 GROUP BY name ORDER BY n DESC LIMIT 10;",
    '<div class="note">\n  <p>Fish &amp; chips &lt;3</p>\n</div>\n{"key": [1, 2.5, -3e10, null, true]}',
    "Numbers 1234567 and 3.14159, 2024-01-31T12:00:00Z, v1.2.3, 0xDEADBEEF, user@example.com, "
    "https://example.org/a?b=1&c=%20",
    "Unicode: café naïve Straße, Ελληνικά, русский, 東京で日本語のテキスト, 한국어, العربية, emoji 🙂🚀👍🏽, e\u0301",
    "    if (x) {\n\treturn y;\n    }\n\n// end\n- item one\n- item two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n",
)
# bfloat16: two correct implementations computing in bfloat16 differ by 4e-3 to 6e-2 on random llama/qwen3 models
# (init std 0.02-0.05, d 48-256), by up to 0.32 on gemma2; a conversion bug moves logits by whole units.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 0.5}
MAX_ROWS = 16  # logit rows compared at most (each a window of at most max_tokens tokens)
PROMPT_TOKENS = 16  # the generation prompt: the first row's first tokens
RANDOM_ROWS = 4  # without any tokenizer: rows of random ids


class CheckError(ValueError):
    """Bad input to the checker; the message names it."""


def read_texts(paths: Sequence[str]) -> list[str]:
    """Each file's whole UTF-8 text (one text per file); CheckError naming a missing, unreadable or empty file."""
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckError(f"--text {path}: cannot be read as UTF-8 text ({type(e).__name__}: {e})") from None
        if not text:
            raise CheckError(f"--text {path}: the file is empty")
        texts.append(text)
    return texts


def _check_args(directory: str, lineage_dir: str | None, version: str | None, dtype: str, atol: float | None,
                max_tokens: int, new_tokens: int) -> None:
    if not os.path.isdir(directory):
        raise CheckError(f"{directory}: no such directory")
    if (lineage_dir is None) != (version is None):
        raise CheckError("--lineage and --version go together: name the lineage and the version in it")
    if dtype not in DTYPES:
        raise CheckError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if atol is not None and not atol >= 0:
        raise CheckError(f"atol {atol}: expected a number >= 0")
    if max_tokens < 2:
        raise CheckError(f"max_tokens {max_tokens}: expected at least 2")
    if new_tokens < 0:
        raise CheckError(f"new_tokens {new_tokens}: expected a number >= 0")


def check_hf(directory: str, *, lineage_dir: str | None = None, version: str | None = None,
             texts: Sequence[str] | None = None, atol: float | None = None, max_tokens: int = 128,
             new_tokens: int = 20, dtype: str = "float32", use_transformers: bool = True) -> CheckReport:
    """Load DIR (or a lineage version) in lmadapt and DIR in transformers and compare them (module docstring).

    dtype: the compute dtype of both sides ("float32": a bfloat16 checkpoint is upcast exactly, so a correct
    conversion agrees to about 1e-5 whatever the stored dtype; "bfloat16": half transformers' memory, looser atol).
    """
    _check_args(directory, lineage_dir, version, dtype, atol, max_tokens, new_tokens)
    directory = os.path.abspath(directory)
    candidate = (lmadapt_from_lineage(lineage_dir, version, dtype) if lineage_dir is not None
                 else lmadapt_from_hf(directory, dtype))
    report = CheckReport(candidate.name, None, dtype, DEFAULT_ATOL[dtype] if atol is None else float(atol))
    reference: Side | None = None
    if use_transformers and transformers_available():
        try:
            reference = TransformersSide(directory, dtype)
        except Exception as e:  # anything transformers raises means it cannot run the checkpoint
            report.problems.append(f"transformers cannot load {directory}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:300] if str(e) else ''}")
            return report
    elif lineage_dir is not None:
        reference = lmadapt_from_hf(directory, dtype)
        report.reference_is_transformers = False
        report.notes.append("torch/transformers are not installed: the version is compared with DIR as lmadapt "
                            "imports it, not with transformers")
    else:
        report.notes.append("torch/transformers are not installed: nothing to compare lmadapt with (install them, "
                            "or pass --lineage/--version to compare a version with DIR)")
    return check_sides(candidate, reference, report, list(texts or DEFAULT_TEXTS), max_tokens, new_tokens)


def check_sides(candidate: LmadaptSide, reference: Side | None, report: CheckReport, texts: list[str],
                max_tokens: int, new_tokens: int) -> CheckReport:
    """Fill `report` with the comparisons of `candidate` against `reference` (None: run the candidate only)."""
    if reference is not None:
        report.reference = reference.name
        if reference.vocab_size != candidate.vocab_size:
            report.problems.append(f"vocabulary sizes differ: {candidate.vocab_size} in lmadapt, "
                                   f"{reference.vocab_size} in the reference")
            return report
    ids, source = _encode(candidate, reference, texts, report)
    length = min(max_tokens, candidate.cfg.max_seq_len)
    bos = candidate.bos_id() if source is candidate else None
    rows = _rows(ids, bos, length) if ids is not None else _random_rows(candidate.vocab_size, length)
    if not rows:
        raise CheckError("the texts encode to no tokens")
    if reference is not None:
        report.logits = compare_logits(candidate, reference, rows)
    report.generation = compare_generation(candidate, reference, rows[0], new_tokens, report)
    return report


def _encode(candidate: LmadaptSide, reference: Side | None, texts: list[str],
            report: CheckReport) -> tuple[list[list[int]] | None, Side | None]:
    """(ids of every text, the side that encoded them), comparing the tokenizers on the way."""
    if reference is None:
        return (candidate.encode(texts), candidate) if candidate.has_tokenizer else (None, None)
    if candidate.has_tokenizer and reference.has_tokenizer:
        mine = candidate.encode(texts)
        report.tokenizer = compare_tokenizers(texts, mine, reference.encode(texts))
        return mine, candidate
    result = TokenizerResult(len(texts))
    if candidate.has_tokenizer or reference.has_tokenizer:
        have, lack = ("lmadapt", "the reference") if candidate.has_tokenizer else ("the reference", "lmadapt")
        why = getattr(reference, "tokenizer_error", "")
        result.problem = f"only {have} has a tokenizer; {lack} loads none" + (f" ({why})" if why else "")
        report.tokenizer = result
        side: Side = candidate if candidate.has_tokenizer else reference
        return side.encode(texts), side
    report.notes.append(f"no tokenizer on either side: logits compared on {RANDOM_ROWS} rows of random token ids")
    return None, None


def compare_tokenizers(texts: Sequence[str], candidate: list[list[int]], reference: list[list[int]]) -> TokenizerResult:
    """How many texts encode differently, and where the first one first differs."""
    result = TokenizerResult(len(texts))
    for text, a, b in zip(texts, candidate, reference, strict=True):
        if list(a) == list(b):
            continue
        result.mismatches += 1
        if result.first_text is None:
            pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            result.first_text, result.position = text, pos
            result.candidate_ids, result.reference_ids = list(a[pos:pos + 4]), list(b[pos:pos + 4])
    return result


def _rows(ids: list[list[int]], bos: int | None, length: int) -> list[np.ndarray]:
    """Each text's ids (after bos) cut into windows of `length` tokens; the first MAX_ROWS non-empty windows."""
    rows: list[np.ndarray] = []
    for seq in ids:
        seq = ([bos] if bos is not None else []) + list(seq)
        rows += [np.asarray(seq[i:i + length], np.int32) for i in range(0, len(seq), length)]
    return [r for r in rows if len(r)][:MAX_ROWS]


def _random_rows(vocab_size: int, length: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, length).astype(np.int32) for _ in range(RANDOM_ROWS)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(candidate: Side, reference: Side, rows: list[np.ndarray]) -> LogitResult:
    """Max |difference|, mean KL(reference || candidate) and top-1 agreement over every real token of `rows`.

    Rows are right-padded (id 0) to one length, so lmadapt compiles once; a causal model's logits at the real
    positions do not depend on the padding after them."""
    width = max(len(r) for r in rows)
    worst, where, kl_sum, agree, count = -1.0, (0, 0), 0.0, 0, 0
    for i, row in enumerate(rows):
        padded = np.zeros(width, np.int32)
        padded[:len(row)] = row
        a = candidate.logits(padded)[:len(row)]
        b = reference.logits(padded)[:len(row)]
        diff = np.abs(a - b)
        if np.isnan(diff).any():
            worst, where = float("nan"), (i, int(np.argmax(np.isnan(diff).any(axis=-1))))
        elif not np.isnan(worst) and diff.max() > worst:
            worst, where = float(diff.max()), (i, int(np.unravel_index(np.argmax(diff), diff.shape)[0]))
        log_b, log_a = _log_softmax(b), _log_softmax(a)
        kl_sum += float(np.sum(np.exp(log_b) * (log_b - log_a)))
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        count += len(row)
    return LogitResult(len(rows), count, worst, where, kl_sum / count, agree / count)


def compare_generation(candidate: LmadaptSide, reference: Side | None, row: np.ndarray, new_tokens: int,
                       report: CheckReport) -> GenerationResult | None:
    """Greedy decode from the row's first tokens on both sides; at the first difference, the reference's margin."""
    prompt = row[:PROMPT_TOKENS]
    room = candidate.cfg.max_seq_len - len(prompt)
    if new_tokens > room:
        report.notes.append(f"generation shortened to {max(room, 0)} tokens: model.max_seq_len is "
                            f"{candidate.cfg.max_seq_len}")
        new_tokens = max(room, 0)
    if new_tokens == 0:
        return None
    mine = candidate.generate(prompt, new_tokens)
    if reference is None:
        return GenerationResult(prompt.tolist(), mine.tolist(), [], candidate.decode(mine), "")
    theirs = reference.generate(prompt, new_tokens)
    result = GenerationResult(prompt.tolist(), mine.tolist(), theirs.tolist(), candidate.decode(mine),
                              reference.decode(theirs))
    diffs = np.flatnonzero(mine != theirs)
    if len(diffs):
        j = int(diffs[0])
        logits = reference.logits(np.concatenate([prompt, theirs[:j]]).astype(np.int32))[-1]
        result.first_diff, result.margin = j, float(logits[theirs[j]] - logits[mine[j]])
    return result

