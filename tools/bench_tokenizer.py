"""Compare the tokenizers lmadapt can train: bytes per token on held-out text, training time, round trip.

    python tools/bench_tokenizer.py                      # vocab 1024 and 8192, 2 MB of each corpus
    python tools/bench_tokenizer.py --vocab 1024 --train-mb 1 --only bpe,spm-bpe

Each bundled corpus (data/*.txt.xz) and the running Python's standard library source is cut into
4096-character documents (as `documents: chars` does); every 10th document is held out, the rest (up to
--train-mb MB of each) trains one tokenizer per candidate on the mixture. Bytes per token: UTF-8 bytes of
the held-out documents over their tokens, each document encoded alone. Exact: held-out documents plus a
battery of tricky strings (code, whitespace runs, tabs, CRLF, emoji, CJK, combining marks) that decode
back to themselves. `spm-normalising` is the SentencePiece setup lmadapt trained before (NFKC, whitespace
collapsed, one line per sentence), for reference.
"""

from __future__ import annotations

import argparse
import glob
import io
import lzma
import os
import sys
import sysconfig
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402

from lmadapt.data.tokenizers import SentencePieceTokenizer, Tokenizer, train_bpe, train_sentencepiece  # noqa: E402
from lmadapt.data.tokenizers.hf import GPT2_PATTERN  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = ("shakespeare", "python_docs", "books_en")
BATTERY = [
    "def f(x):\n    return x  +  1\n\nprint(f(2))\n", "\tindented\twith\ttabs\n\t\t", "line\r\nwindows\r\n",
    "   leading and trailing   ", "emoji \U0001F600\U0001F389 \U0001F469\u200d\U0001F467", "\u6f22\u5b57\u304b\u306a",
    "e\u0301 n\u0303 combining", "", "\n\n\n", "  \u00a0 nbsp", "\ufb01 ligature \uff21\uff22 fullwidth", "x" * 50,
    "<s> </s> <pad> literal specials"]


def _normalising_spm(texts: list[str], vocab_size: int) -> Tokenizer:
    lines = (line for t in texts for line in t.splitlines() if line.strip())
    out = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=out, vocab_size=vocab_size, model_type="bpe",
                                   byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
                                   num_threads=2)
    return SentencePieceTokenizer(out.getvalue())


CANDIDATES: dict[str, Callable[[list[str], int], Tokenizer]] = {
    "bpe": lambda t, v: train_bpe(t, v),
    "bpe-gpt2-split": lambda t, v: train_bpe(t, v, pattern=GPT2_PATTERN),
    "spm-bpe": lambda t, v: train_sentencepiece(t, v, model_type="bpe"),
    "spm-unigram": lambda t, v: train_sentencepiece(t, v, model_type="unigram"),
    "spm-normalising": _normalising_spm,
}


def _documents(text: str, size: int = 4096) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def load_corpora(train_mb: float) -> tuple[list[str], dict[str, list[str]]]:
    """(training documents of every corpus, {corpus: held-out documents})."""
    texts = {}
    for name in CORPORA:
        with lzma.open(os.path.join(ROOT, "data", f"{name}.txt.xz"), "rt", encoding="utf-8") as f:
            texts[name] = f.read()
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    code = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            code.append(f.read())
        if sum(map(len, code)) > 8 * train_mb * 1e6:
            break
    texts["python_stdlib"] = "\n".join(code)
    train, held = [], {}
    for name, text in texts.items():
        docs = _documents(text)
        held[name] = docs[::10][:100]  # at most ~400 KB held out per corpus
        rest = [d for i, d in enumerate(docs) if i % 10]
        train += rest[:int(train_mb * 1e6 / 4096)]
    return train, held


def measure(name: str, train: list[str], held: dict[str, list[str]], vocab: int) -> dict[str, object]:
    t0 = time.perf_counter()
    tok = CANDIDATES[name](train, vocab)
    seconds = time.perf_counter() - t0
    row: dict[str, object] = {"tokenizer": name, "vocab": tok.vocab_size, "train_s": seconds}
    for corpus, docs in held.items():
        n_tokens = sum(len(ids) for ids in tok.encode(docs))
        row[corpus] = sum(len(d.encode()) for d in docs) / n_tokens
    probes = [d for docs in held.values() for d in docs] + BATTERY
    row["exact"] = sum(a == b for a, b in zip(tok.decode(tok.encode(probes)), probes, strict=True)) / len(probes)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="1024,8192", help="comma-separated vocabulary sizes")
    parser.add_argument("--train-mb", type=float, default=2.0, help="MB of training text taken from each corpus")
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    args = parser.parse_args(argv)
    train, held = load_corpora(args.train_mb)
    print(f"training on {sum(map(len, train)) / 1e6:.1f} M characters; held out: "
          + ", ".join(f"{k} {sum(map(len, v)) / 1e3:.0f} K" for k, v in held.items()))
    cols = list(held)
    print("| tokenizer | vocab | " + " | ".join(f"{c} B/tok" for c in cols) + " | train s | exact |")
    print("|---|---:|" + "---:|" * len(cols) + "---:|---:|")
    for vocab in [int(v) for v in args.vocab.split(",")]:
        for name in args.only.split(","):
            r = measure(name, train, held, vocab)
            print(f"| {name} | {r['vocab']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                  + f" | {r['train_s']:.1f} | {100 * r['exact']:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
