"""Tokenizers: train, save, load, round trip; files written by sentencepiece itself load too."""

import io
import lzma
import os

import numpy as np
import pytest
import sentencepiece as spm

from helpers import ROOT
from lmadapt.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def corpus() -> str:
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        return f.read()[:300_000]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_save_load_round_trip(tmp_path, corpus, model_type):
    tok = train_sentencepiece([corpus], 500, model_type=model_type, user_defined_symbols=["<sep>"])
    assert tok.vocab_size == 500
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.piece_to_id("<sep>") == 4  # user symbols follow the fixed specials
    path = tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.fingerprint == tok.fingerprint and os.path.basename(path) == "tokenizer.model"
    texts = ["To be, or not to be: that is the question.", "Ünïcödé ✓ and emoji 😀 <sep> too"]
    ids = again.encode(texts)
    assert again.decode(ids) == texts  # byte fallback: nothing becomes <unk>
    assert ids[0] == tok.encode(texts[:1])[0]
    # Real text compresses: far fewer tokens than bytes.
    assert len(ids[0]) < len(texts[0].encode()) / 2


def test_training_is_deterministic(corpus):
    a = train_sentencepiece([corpus[:100_000]], 500)
    b = train_sentencepiece([corpus[:100_000]], 500)
    assert a.fingerprint == b.fingerprint


def test_loads_a_model_written_by_sentencepiece_itself(tmp_path, corpus):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(corpus[:100_000], encoding="utf-8")
    prefix = tmp_path / "native"
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix), vocab_size=400,
                                   model_type="unigram", minloglevel=2)
    ours = load_tokenizer(f"{prefix}.model")
    native = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    text = "Now is the winter of our discontent"
    assert ours.encode([text])[0] == native.encode(text)
    assert ours.decode([native.encode(text)])[0] == text
    assert ours.eos_id == native.eos_id() and ours.bos_id == native.bos_id()


def test_byte_tokenizer_and_documents(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(["héllo"])) == ["héllo"]
    (doc,) = tok.encode_documents(["ab"])
    np.testing.assert_array_equal(doc, [tok.bos_id, 97, 98, tok.eos_id])
    tok.save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


def test_bad_tokenizer_files_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file '.*nope.model' not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(str(junk))
    with pytest.raises(TokenizerError, match="holds no tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="expected 'bpe' or 'unigram'"):
        train_sentencepiece(["x"], 100, model_type="wordpiece")


def test_model_proto_round_trips_through_bytes(corpus):
    tok = train_sentencepiece([corpus[:50_000]], 500)
    again = SentencePieceTokenizer(io.BytesIO(tok.model_proto).read())
    assert again.encode(["hello"]) == tok.encode(["hello"])


def test_train_tokenizer_tool(tmp_path):
    from helpers import run_cmd

    out = tmp_path / "tok.model"
    result = run_cmd(["tools/train_tokenizer.py", "--out", str(out), "--vocab-size", "400", "--user-symbols", "<sep>",
                      "data/shakespeare.txt.xz"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vocab 400" in result.stdout and "bytes/token" in result.stdout
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 400 and tok.piece_to_id("<sep>") == 4
    missing = run_cmd(["tools/train_tokenizer.py", "--out", str(out), str(tmp_path / "nope.txt")])
    assert missing.returncode == 2 and "nope.txt' not found" in missing.stderr
