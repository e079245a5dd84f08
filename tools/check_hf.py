"""Check that a Hugging Face checkpoint computes the same function in lmadapt as in transformers.

    python tools/check_hf.py DIR                                  # DIR's own weights, in lmadapt and in transformers
    python tools/check_hf.py DIR --lineage LINEAGE --version ID   # a version (e.g. the one exported to DIR) vs DIR
    python tools/check_hf.py DIR --text notes.md code.py --atol 1e-3 --max-tokens 256 --new-tokens 20

Prints tokenizer mismatches (lmadapt's tokenizer vs AutoTokenizer, no special tokens added: how many texts differ,
the first such text and position), the max |logit difference| and mean KL(transformers || lmadapt) per token on the
same ids, and 20 greedily generated tokens from each with its KV cache (equal or not, both decoded). The texts are a
built-in battery of prose, code, whitespace and non-Latin text, or the files given with --text (one text each).

--dtype is the compute dtype of both sides. float32 (default): a bfloat16 checkpoint is upcast exactly, so only
float32 rounding differs; default --atol 1e-4 (a deep model with large logits may need 1e-3). bfloat16: about half
transformers' memory; default --atol 0.5, as two correct bfloat16 implementations differ by up to a few tenths, so
small errors go unseen. Greedy decoding that differs at a near tie (the reference scores both tokens within --atol)
is reported, not failed.

Exit status: 0 everything matched; 1 a logit difference above --atol, a tokenizer difference, a generation
difference, or transformers cannot load DIR; 2 bad input (one line naming it); 3 torch/transformers are not
installed, so DIR was not run in transformers (with --lineage/--version the version is still compared with DIR as
lmadapt imports it, and a difference there exits 1).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("--lineage", default=None, help="a lineage directory: compare its --version with DIR")
    parser.add_argument("--version", default=None, help="the version of --lineage to compare")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 files, one text each")
    parser.add_argument("--atol", type=float, default=None, help="max |logit difference| (1e-4 float32, 0.5 bf16)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per compared row (default 128)")
    parser.add_argument("--new-tokens", type=int, default=20, help="greedy tokens generated (default 20)")
    args = parser.parse_args(argv)

    import contextlib

    import jax

    from lmadapt.config import ConfigError
    from lmadapt.data.tokenizers import TokenizerError
    from lmadapt.hf import HFError
    from lmadapt.hf.logit_check import CheckError, check_hf, read_texts
    from lmadapt.lineage.store import LineageError

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar between the report lines
    except ImportError:
        pass
    try:
        texts = read_texts(args.text) if args.text else None
        # On a GPU, JAX's default fp32 matmul is TF32-like: a 1e-4 check would test that rounding, not the model.
        exact = jax.default_matmul_precision("highest") if args.dtype == "float32" else contextlib.nullcontext()
        with exact:
            report = check_hf(args.directory, lineage_dir=args.lineage, version=args.version, texts=texts,
                              atol=args.atol, max_tokens=args.max_tokens, new_tokens=args.new_tokens,
                              dtype=args.dtype)
    except (CheckError, HFError, LineageError, TokenizerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
