"""Tokenizers: one interface over raw bytes, SentencePiece models and Hugging Face `tokenizer.json` files.

Kinds (each in its own module, all importable from here):
  bytes          `ByteTokenizer`: UTF-8 bytes, no model (lmadapt.data.tokenizers.base)
  sentencepiece  `SentencePieceTokenizer`: any `.model` file; `train_sentencepiece` trains a lossless one
                 (lmadapt.data.tokenizers.spm)
  hf             `HFTokenizer`: any `tokenizer.json` with its tokenizer_config.json, encoding as transformers'
                 AutoTokenizer; `train_bpe` trains the lossless byte-level BPE the bundled configs use
                 (lmadapt.data.tokenizers.hf)
A tokenizer is identified by its `fingerprint` (a hash of its model file), which keys the token cache; it
travels with every checkpoint and model version as the files `save` writes, so a version is self-contained.
"""

from __future__ import annotations

import hashlib
import os

from lmadapt.data.tokenizers.base import (
    BYTES_FILE,
    EXPORT_SOURCE_FILE,
    HF_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
)
from lmadapt.data.tokenizers.export import save_hf_tokenizer
from lmadapt.data.tokenizers.hf import (
    HFTokenizer,
    load_hf_tokenizer,
    pick_chat_template,
    read_tokenizer_config,
    train_bpe,
)
from lmadapt.data.tokenizers.spm import SentencePieceTokenizer, train_sentencepiece
from lmadapt.files import paths
from lmadapt.files.paths import special_problem

__all__ = ["BYTES_FILE", "HF_CONFIG_FILE", "HF_TOKENIZER_FILE", "TOKENIZER_FILE", "ByteTokenizer", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "TokenizerError", "load_hf_directory_tokenizer",
           "load_hf_tokenizer", "load_tokenizer", "save_hf_tokenizer", "train_bpe", "train_sentencepiece"]


def load_hf_directory_tokenizer(directory: str) -> Tokenizer | None:
    """The tokenizer a directory carries (a Hugging Face checkpoint, a run, a model version), or None.

    tokenizer.json wins over tokenizer.model when both are present (as transformers' fast tokenizers do), except
    in lmadapt's own exports, where an unchanged tokenizer.json gives back the tokenizer it was made from;
    a SentencePiece model takes its chat template from tokenizer_config.json; tokenizer.bytes is lmadapt's
    byte tokenizer. Files that are present but unusable raise TokenizerError naming them.
    """
    for name in (HF_TOKENIZER_FILE, TOKENIZER_FILE, BYTES_FILE, EXPORT_SOURCE_FILE):
        # A pipe or device named like a tokenizer file must not be skipped for the next kind (a wrong tokenizer)
        # nor opened (a pipe blocks).
        if (problem := special_problem(os.path.join(directory, name))) is not None:
            raise TokenizerError(f"{os.path.join(directory, name)} {problem}")
    if os.path.isfile(os.path.join(directory, HF_TOKENIZER_FILE)):
        return _exported_from(directory) or load_hf_tokenizer(directory)
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        return _sentencepiece(directory)
    if os.path.isfile(os.path.join(directory, BYTES_FILE)):
        return ByteTokenizer()
    return None


def _exported_from(directory: str) -> Tokenizer | None:
    """The lmadapt tokenizer an export's tokenizer.json was made from, if it is there and the file is unchanged."""
    record_path = os.path.join(directory, EXPORT_SOURCE_FILE)
    if not os.path.isfile(record_path):
        return None
    try:
        record = paths.read_json(record_path, ValueError)
        with open(os.path.join(directory, HF_TOKENIZER_FILE), "rb") as f:
            unchanged = hashlib.sha256(f.read()).hexdigest() == record["tokenizer_json_sha256"]
        source = record["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not ours after all: tokenizer.json is the tokenizer
    if not unchanged or source not in (TOKENIZER_FILE, BYTES_FILE):
        return None
    if not os.path.isfile(os.path.join(directory, source)):
        return None
    return ByteTokenizer() if source == BYTES_FILE else _sentencepiece(directory)


def _sentencepiece(directory: str) -> SentencePieceTokenizer:
    """tokenizer.model of `directory`, with the chat template of the tokenizer_config.json beside it."""
    tok = SentencePieceTokenizer.load(os.path.join(directory, TOKENIZER_FILE))
    tok.chat_template = pick_chat_template(read_tokenizer_config(directory).get("chat_template"))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load `path`: "bytes", a `.model` or `tokenizer.json` file, or a directory holding one (or tokenizer.bytes)."""
    if path == "bytes":
        return ByteTokenizer()
    if (problem := special_problem(path)) is not None and problem != "is a directory, not a regular file":
        raise TokenizerError(f"tokenizer {path!r} {problem.replace('regular file', 'regular file or directory')}")
    if os.path.isdir(path):
        tok = load_hf_directory_tokenizer(path)
        if tok is None:
            raise TokenizerError(f"directory {path!r} holds no {HF_TOKENIZER_FILE}, {TOKENIZER_FILE} or {BYTES_FILE}")
        return tok
    if path.endswith(".json"):
        return load_hf_tokenizer(path)
    return SentencePieceTokenizer.load(path)
