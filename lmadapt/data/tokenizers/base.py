"""The tokenizer interface every kind implements, its error, and the byte tokenizer (no model at all).

`lmadapt.data.tokenizers` re-exports everything here; import from there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece model
HF_TOKENIZER_FILE = "tokenizer.json"  # a `tokenizers` (Hugging Face) tokenizer
HF_CONFIG_FILE = "tokenizer_config.json"  # its special tokens and chat template
BYTES_FILE = "tokenizer.bytes"  # marker file: the byte tokenizer needs no model
EXPORT_SOURCE_FILE = "lmadapt_tokenizer.json"  # in an export: the lmadapt file its tokenizer.json was made from


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or trained; the message names the file or setting."""


class Tokenizer:
    """Common interface: `encode` texts to id lists, `decode` ids to text, special ids, a fingerprint.

    `encode` adds no special tokens; `encode_documents` adds bos (when the tokenizer has one) and eos.
    `chat_template` is the Jinja chat template the tokenizer came with (None when it had none).
    """

    vocab_size: int
    bos_id: int  # -1 when the tokenizer has no such token (or, for imported ones, does not prepend it)
    eos_id: int
    pad_id: int
    fingerprint: str
    chat_template: str | None = None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        raise NotImplementedError

    def save(self, directory: str) -> str:
        """Write the tokenizer into `directory`; return the (main) file written."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of the original text each token id stands for (specials 0), for bits per byte."""
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of whole documents: bos (if any) + text + eos, as int32 arrays."""
        head = [self.bos_id] if self.bos_id >= 0 else []
        return [np.asarray(head + ids + [self.eos_id], np.int32) for ids in self.encode(texts)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then bos=256, eos=257, pad=258: no training, any text, tiny vocabulary."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    fingerprint = "bytes-v1"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [bytes(i for i in row if 0 <= i < 256).decode("utf-8", errors="replace") for row in ids]

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int64)
        table[:256] = 1
        return table

    def save(self, directory: str) -> str:
        path = os.path.join(directory, BYTES_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.fingerprint + "\n")
        return path


def write_atomic(path: str, data: bytes) -> str:
    """Write `data` to `path` through a temporary sibling, so readers never see half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
