"""SentencePiece tokenizers: any `.model` file (Llama, Gemma, T5 ...) loads as is; lmadapt trains lossless ones.

A model is held as its serialized bytes, which are its fingerprint and travel as `tokenizer.model`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from lmadapt.data.tokenizers.base import HF_CONFIG_FILE, TOKENIZER_FILE, Tokenizer, TokenizerError, write_atomic
from lmadapt.files.paths import open_regular


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
        # Threads of one batch encode (-1: all cores); tokenizing worker processes divide the cores between them.
        self.threads = int(os.environ.get("LMADAPT_ENCODE_THREADS", "-1"))

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Read a `.model` file."""
        with open_regular(path, TokenizerError) as f:  # a pipe or device is named, never opened
            return cls(f.read(), origin=path)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self._sp.decode([[int(i) for i in row] for row in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def token_bytes(self) -> np.ndarray:
        # "▁" stands for one space, a byte piece "<0x0A>" for one byte; control and unknown pieces spell nothing
        # (unk stands for unknown text: bits per byte of a model without byte fallback undercounts it).
        table = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
                continue
            piece = self._sp.id_to_piece(i)
            table[i] = 1 if self._sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def save(self, directory: str) -> str:
        if self.chat_template is not None:  # a template imported with the model travels beside it
            config = {"chat_template": self.chat_template}
            write_atomic(os.path.join(directory, HF_CONFIG_FILE), (json.dumps(config, indent=2) + "\n").encode())
        return write_atomic(os.path.join(directory, TOKENIZER_FILE), self._proto)


def _training_chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Texts cut at line ends into "sentences" of at most `max_chars`, newlines kept, so pieces can learn them."""
    for text in texts:
        if len(text) <= max_chars:
            if text:
                yield text
            continue
        cur: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if cur and size + len(line) > max_chars:
                yield "".join(cur)
                cur, size = [], 0
            while len(line) > max_chars:  # one very long line: hard cuts
                yield line[:max_chars]
                line = line[max_chars:]
            if line:
                cur.append(line)
                size += len(line)
        if cur:
            yield "".join(cur)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
                        byte_fallback: bool = True, user_defined_symbols: Sequence[str] = (),
                        character_coverage: float = 0.9995, max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                        num_threads: int = 2) -> SentencePieceTokenizer:
    """Train a lossless SentencePiece model in memory: `decode(encode(t)) == t` for every text.

    No normalisation (identity rule), whitespace kept (runs of spaces may become pieces), no dummy prefix;
    texts are fed in chunks of whole lines with their newlines, so newlines and indentation are learned.
    Ids: 0 pad, 1 unk, 2 bos, 3 eos, then user-defined symbols, then the learned pieces; byte fallback
    (on by default; without it unseen characters become unk, which is lossy) encodes every string.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"tokenizer.model_type {model_type!r}: expected 'bpe' or 'unigram'")
    out = io.BytesIO()
    spm.set_random_generator_seed(0)  # the same texts give the same model bytes (and cache keys)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_chunks(texts, max_sentence_length // 4),  # <= 4 UTF-8 bytes a character
            model_writer=out, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=byte_fallback, user_defined_symbols=list(user_defined_symbols),
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, num_threads=num_threads,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_by_whitespace=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=True, minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"training a {model_type} tokenizer with vocab_size={vocab_size} failed: {e}") from None
    return SentencePieceTokenizer(out.getvalue(), origin="<trained>")
