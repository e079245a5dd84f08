"""Tokenizer files serving stacks read as is: `tokenizer.json` + `tokenizer_config.json` (+ `tokenizer.model`).

`save_hf_tokenizer` writes them for every kind so that `transformers.AutoTokenizer.from_pretrained(dir)`
encodes exactly as lmadapt's `encode` (with `add_special_tokens=True` it prepends lmadapt's bos):
  hf             its own tokenizer.json, unchanged;
  sentencepiece  a tokenizer.json rebuilt from the model's pieces, scores and normaliser settings, beside
                 tokenizer.model. BPE models without normalisation (lmadapt's, Llama 2's) convert exactly
                 (checked against SentencePiece on a battery of strings before anything is written: a
                 difference is an error). Others convert nearly, and a difference on the battery is a warning:
                 `tokenizers`' NFKC tables do not reorder combining marks as SentencePiece's do; for unigram
                 models it sums scores in float64 where SentencePiece uses float32, so equal-scoring
                 segmentations (runs like "=====") can break differently, and a control token's text ("<s>")
                 next to characters the model lacks may match the control piece;
  bytes          a tokenizer.json mapping bytes 0..255 to ids 0..255 (byte-level, no merges), bos/eos/pad 256-258.
Special tokens written in a text are encoded as text by lmadapt's SentencePiece and byte tokenizers, so the
configs say `split_special_tokens: true`. `lmadapt_tokenizer.json` records which lmadapt file the tokenizer.json
was made from, so importing the directory gives back the same tokenizer (same fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from lmadapt.data.tokenizers.base import (
    BYTES_FILE,
    EXPORT_SOURCE_FILE,
    HF_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    write_atomic,
)
from lmadapt.data.tokenizers.hf import SPECIAL_TOKENS_MAP_FILE, HFTokenizer, byte_decoder
from lmadapt.data.tokenizers.spm import SentencePieceTokenizer

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
PROBES = ["def f(x):\n    return x  +  1\n\nprint(f(2))\n", "\tif a:\n\t\tb = 'c'\r\n", "  leading", "trailing  ",
          "a  b   c    d", "\n", "\n\n\n", " ", "", "Hello, World! 1234567", "caf\u00e9 na\u0131ve e\u0301",
          "\u6f22\u5b57\u304b\u306a", "emoji \U0001F600\U0001F469\u200d\U0001F467", "\x00\x01\x7f",
          "n\u0303\u0323 e\u0301", "<s> </s> <pad> <unk>", "\u00a0\u2003\u3000 odd spaces",
          "\ufb01\uff21 \u2581 \u0120 \u010a", "x" * 300 + " " * 40 + "y"]


def _bos_post_processor(bos: str | None, bos_id: int) -> processors.PostProcessor | None:
    if bos is None:
        return None
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def byte_tokenizer_json(tok: ByteTokenizer) -> bytes:
    """A byte-level tokenizer.json with no merges: byte b is id b (as GPT-2's alphabet spells it), then specials."""
    vocab = byte_decoder()
    backend = _Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>", "<pad>")])
    backend.post_processor = _bos_post_processor("<s>", tok.bos_id)
    return backend.to_str().encode("utf-8")


def _spm_merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule (merge the adjacent pair whose result scores highest)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = [(-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _proto(tok: SentencePieceTokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    return proto


def sentencepiece_tokenizer_json(tok: SentencePieceTokenizer) -> bytes:
    """A tokenizer.json that encodes as the SentencePiece model does (BPE or unigram models)."""
    proto = _proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type not in (1, 2) or spec.treat_whitespace_as_suffix:
        raise TokenizerError("a SentencePiece model of type word/char or with treat_whitespace_as_suffix has no "
                             "exact tokenizer.json equivalent; export it with tokenizer.model only")
    pieces = [p.piece for p in proto.pieces]
    if spec.model_type == 2:
        model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=_spm_merges(proto),
                           unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=spec.byte_fallback)
    else:
        # Control, unknown, unused and byte pieces are never matched against text by SentencePiece: keep them out
        # of the Viterbi search with a score no path can prefer.
        low = min(p.score for p in proto.pieces if p.type in (_NORMAL, _USER)) - 1e6
        vocab = [(p.piece, p.score if p.type in (_NORMAL, _USER) else low) for p in proto.pieces]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    backend = _Backend(model)
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # only spaces: SentencePiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1 if norm.add_dummy_prefix else 0, 0)])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == _USER])
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                                if p.type in (_CONTROL, _UNKNOWN)])
    backend.post_processor = _bos_post_processor(pieces[tok.bos_id] if tok.bos_id >= 0 else None, tok.bos_id)
    return backend.to_str().encode("utf-8")


def _special_names(tok: Tokenizer, backend: _Backend) -> dict[str, str | None]:
    name = lambda i: backend.id_to_token(i) if i >= 0 else None
    unk = tok.unk_id if isinstance(tok, SentencePieceTokenizer) else -1  # other kinds: the config's, if any
    return {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
            "unk_token": name(unk)}


def first_difference(tok: Tokenizer, tokenizer_json: bytes, split_special_tokens: bool,
                     extra: list[str]) -> str | None:
    """The first probe string (of PROBES + `extra`) that `tokenizer_json` encodes differently from `tok`, if any."""
    backend = _Backend.from_str(tokenizer_json.decode("utf-8"))
    backend.encode_special_tokens = split_special_tokens
    probes = PROBES + extra
    got = [e.ids for e in backend.encode_batch(probes, add_special_tokens=False)]
    for text, want, ids in zip(probes, tok.encode(probes), got, strict=True):
        if want != ids:
            return (f"the tokenizer.json made from {tok.fingerprint} encodes {text[:60]!r} as {ids[:12]} where "
                    f"lmadapt gives {want[:12]}")
    return None


def _sentencepiece_files(tok: SentencePieceTokenizer, directory: str) -> tuple[bytes, list[str]]:
    data = sentencepiece_tokenizer_json(tok)
    proto = _proto(tok)
    named = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN, _USER)]
    problem = first_difference(tok, data, True, [f"{s}a{s} {s}\n {s}" for s in named[:1000]])
    exact = proto.trainer_spec.model_type == 2 and not proto.normalizer_spec.precompiled_charsmap
    if problem and exact:
        raise TokenizerError(f"{problem}; not exporting a tokenizer that encodes differently")
    if problem:  # see the module docstring
        warnings.warn(f"{problem} (a unigram or normalising SentencePiece model converts nearly, not exactly)",
                      stacklevel=3)
    return data, [tok.save(directory)]


def save_hf_tokenizer(tok: Tokenizer, directory: str, model_max_length: int | None = None) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (+ tokenizer.model for SentencePiece,
    the chat template when the tokenizer has one) into `directory`; return the paths written.

    `transformers.AutoTokenizer.from_pretrained(directory)` then encodes as `tok.encode` does.
    """
    config: dict[str, Any] = {}
    written: list[str] = []
    if isinstance(tok, HFTokenizer):
        data, split = tok.tokenizer_json, bool(tok.config.get("split_special_tokens", False))
        config = {k: v for k, v in tok.config.items() if k not in ("auto_map", "chat_template")}
        source = None
    elif isinstance(tok, SentencePieceTokenizer):
        (data, written), split, source = _sentencepiece_files(tok, directory), True, TOKENIZER_FILE
    elif isinstance(tok, ByteTokenizer):
        data, split, source = byte_tokenizer_json(tok), True, BYTES_FILE
        written.append(tok.save(directory))
    else:
        raise TokenizerError(f"no Hugging Face export for a {type(tok).__name__}")
    backend = _Backend.from_str(data.decode("utf-8"))
    specials = _special_names(tok, backend)
    # A generic fast tokenizer reads tokenizer.json as it is, where a model-specific class may rebuild its pipeline.
    config.update({k: v for k, v in specials.items() if v is not None or k not in config},
                  tokenizer_class="PreTrainedTokenizerFast", split_special_tokens=split,
                  clean_up_tokenization_spaces=False, add_bos_token=tok.bos_id >= 0, add_eos_token=False)
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    dump = lambda obj: (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    written.append(write_atomic(os.path.join(directory, HF_TOKENIZER_FILE), data))
    written.append(write_atomic(os.path.join(directory, HF_CONFIG_FILE), dump(config)))
    written.append(write_atomic(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE),
                                dump({k: v for k, v in specials.items() if v is not None})))
    if source is not None:
        record = {"source": source, "tokenizer_json_sha256": hashlib.sha256(data).hexdigest()}
        written.append(write_atomic(os.path.join(directory, EXPORT_SOURCE_FILE), dump(record)))
    return written
