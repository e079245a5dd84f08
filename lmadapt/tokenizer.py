"""Tokenizers: SentencePiece models (trained here or loaded from any `.model` file) and raw bytes.

A tokenizer is identified by the bytes of its model file (`fingerprint`), which key the token cache
and travel with every checkpoint and model version as `tokenizer.model`, so a version is self-contained.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
BYTES_FILE = "tokenizer.bytes"  # marker file: the byte tokenizer needs no model


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or trained; the message names the file or setting."""


class Tokenizer:
    """Common interface: `encode` texts to id lists, `decode` ids to text, special ids, a fingerprint."""

    vocab_size: int
    bos_id: int  # -1 when the tokenizer has no such token
    eos_id: int
    pad_id: int
    fingerprint: str

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        raise NotImplementedError

    def save(self, directory: str) -> str:
        """Write the tokenizer into `directory`; return the file written."""
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

    def save(self, directory: str) -> str:
        path = os.path.join(directory, BYTES_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.fingerprint + "\n")
        return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model held as its serialized bytes (BPE or unigram; Llama, Gemma and T5 files load)."""

    def __init__(self, model_proto: bytes, origin: str = "<bytes>"):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError with a C++ message
            raise TokenizerError(f"{origin}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"{origin}: the SentencePiece model has no eos token; documents need one")
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id  # padding is masked out of the loss anyway
        self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:32]

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path!r} not found")
        with open(path, "rb") as f:
            return cls(f.read(), origin=path)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self._sp.decode([[int(i) for i in row] for row in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def save(self, directory: str) -> str:
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)
        return path


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
                        byte_fallback: bool = True, user_defined_symbols: Sequence[str] = (),
                        character_coverage: float = 0.9995, max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                        num_threads: int = 2) -> SentencePieceTokenizer:
    """Train a SentencePiece model in memory from texts (one "sentence" per line of each text).

    Ids: 0 pad, 1 unk, 2 bos, 3 eos, then user-defined symbols, then the learned pieces; byte
    fallback (on by default) makes every string encodable without unk.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"tokenizer.model_type {model_type!r}: expected 'bpe' or 'unigram'")

    def lines():
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line[:max_sentence_length]

    out = io.BytesIO()
    spm.set_random_generator_seed(0)  # the same texts give the same model bytes (and cache keys)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=byte_fallback, user_defined_symbols=list(user_defined_symbols),
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, num_threads=num_threads,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=True, minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"training a {model_type} tokenizer with vocab_size={vocab_size} failed: {e}") from None
    return SentencePieceTokenizer(out.getvalue(), origin="<trained>")


def load_tokenizer(path: str) -> Tokenizer:
    """Load `path`: a `.model` file, a directory holding `tokenizer.model`/`tokenizer.bytes`, or "bytes"."""
    if path == "bytes":
        return ByteTokenizer()
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            return SentencePieceTokenizer.load(os.path.join(path, TOKENIZER_FILE))
        if os.path.isfile(os.path.join(path, BYTES_FILE)):
            return ByteTokenizer()
        raise TokenizerError(f"directory {path!r} holds no {TOKENIZER_FILE} or {BYTES_FILE}")
    return SentencePieceTokenizer.load(path)
