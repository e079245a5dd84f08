"""Train a lossless tokenizer from files or from a run config's training sources.

    python tools/train_tokenizer.py --out tok/ --vocab-size 8192 data/books_en.txt.xz 'corpus/*.txt'
    python tools/train_tokenizer.py --out tok/ --config configs/quickstart.yaml [key.sub=value ...]
    python tools/train_tokenizer.py --kind sentencepiece --out tok.model --vocab-size 8000 FILES

`--kind bpe` (the default; with --config, the config's tokenizer.kind when it is bpe or sentencepiece) trains
the byte-level BPE that `tokenizer.kind=bpe` trains, written as a directory (tokenizer.json and
tokenizer_config.json): use it with `tokenizer.kind=bpe tokenizer.path=tok/`. `--kind sentencepiece` writes a
.model file: `tokenizer.kind=sentencepiece tokenizer.path=tok.model`. Prints the vocabulary size, the
fingerprint and how many bytes of training text one token covers on average.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmadapt.config import ConfigError, SourceConfig, load_config  # noqa: E402
from lmadapt.data import DataError  # noqa: E402
from lmadapt.data.sources import read_source  # noqa: E402
from lmadapt.data.tokenizers import TokenizerError, train_bpe, train_sentencepiece  # noqa: E402
from lmadapt.data.tokenizers.base import write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a directory (bpe) or a .model file (sentencepiece)")
    parser.add_argument("--config", help="train on this run config's data.sources instead of INPUTS")
    parser.add_argument("--kind", choices=["bpe", "sentencepiece"], default=None, help="default: bpe")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: tokenizer.vocab_size, else 2048")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default=None, help="sentencepiece only")
    parser.add_argument("--no-byte-fallback", action="store_true",
                        help="sentencepiece only: unknown characters become <unk> (lossy)")
    parser.add_argument("--user-symbols", default="", help="comma-separated special tokens, e.g. '<sep>,<cls>'")
    parser.add_argument("inputs", nargs="*", help="files, folders or globs (with --config: key.sub=value overrides)")
    args = parser.parse_args(argv)
    try:
        if args.config:
            cfg = load_config(args.config, args.inputs)
            sources, tok = cfg.data.sources, cfg.tokenizer
            vocab, model_type = args.vocab_size or tok.vocab_size, args.model_type or tok.model_type
            kind = args.kind or (tok.kind if tok.kind in ("bpe", "sentencepiece") else "bpe")
            symbols = tok.user_defined_symbols
        else:
            if not args.inputs:
                parser.error("give input files or --config")
            sources = [SourceConfig(name=f"input{i}", path=p) for i, p in enumerate(args.inputs)]
            vocab, model_type, kind, symbols = args.vocab_size or 2048, args.model_type or "bpe", args.kind or "bpe", []
        symbols = [*symbols, *(s for s in args.user_symbols.split(",") if s)]
        texts = [d.prompt + d.text if d.prompt else d.text for src in sources for d in read_source(src).documents]
        if kind == "bpe":
            tokenizer = train_bpe(texts, vocab, user_defined_symbols=symbols)
        else:
            tokenizer = train_sentencepiece(texts, vocab, model_type=model_type,
                                            byte_fallback=not args.no_byte_fallback, user_defined_symbols=symbols)
    except (ConfigError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if kind == "bpe":
        os.makedirs(args.out, exist_ok=True)
        tokenizer.save(args.out)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_atomic(args.out, tokenizer.model_proto)
    sample = texts[: max(1, len(texts) // 20)]
    n_bytes = sum(len(t.encode()) for t in sample)
    n_tokens = sum(len(ids) for ids in tokenizer.encode(sample))
    what = kind if kind == "bpe" else f"sentencepiece {model_type}"
    print(f"wrote {args.out}: {what}, vocab {tokenizer.vocab_size}, {tokenizer.fingerprint}, "
          f"{n_bytes / max(n_tokens, 1):.2f} bytes/token on {len(sample)} training documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
