"""Tokenizers: train, save, load, round trip (property-tested: lossless on any text); files written by
sentencepiece itself load too; bits-per-byte tables count the original UTF-8 bytes."""

import glob
import io
import json
import lzma
import os
import pathlib
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ISSUE_EXAMPLE, PIECES, ROOT
from lmadapt.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_hf_directory_tokenizer,
    load_tokenizer,
    train_bpe,
    train_sentencepiece,
)
from lmadapt.eval.scoring import token_bytes

CODE_LIKE = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)  # no lone surrogates: not UTF-8
WHITESPACE = st.text(st.sampled_from(" \t\r\n\x0b\x0c\u00a0\u2003\u3000"), max_size=40)
TEXTS = st.one_of(CODE_LIKE, ANY_TEXT, WHITESPACE, st.lists(st.one_of(CODE_LIKE, ANY_TEXT), max_size=4).map("".join))
# SentencePiece spells a space "\u2581" and decodes every "\u2581" as a space: the one character it cannot keep.
SPM_TEXTS = TEXTS.filter(lambda t: "\u2581" not in t)


@pytest.fixture(scope="module")
def corpus() -> str:
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        return f.read()[:300_000]


@pytest.fixture(scope="module")
def mixed(corpus) -> list[str]:
    """Prose, code and a little of everything else: what the property tests' tokenizers train on."""
    code_dir = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    code = [pathlib.Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(os.path.join(code_dir, "*.py")))]
    return [corpus[:60_000], *code, "\t\tTabs\r\nand CRLF\r\n \U0001F600 \u6f22\u5b57 e\u0301 " * 20]


@pytest.fixture(scope="module")
def trained(mixed) -> dict:
    """One small trained tokenizer of each trainable kind, shared by the module's tests."""
    return {"bpe": train_bpe(mixed, 600), "sentencepiece": train_sentencepiece(mixed, 600)}


def test_the_issue_example_survives_and_newlines_are_learned(trained):
    for kind, tok in trained.items():
        assert tok.decode(tok.encode([ISSUE_EXAMPLE])) == [ISSUE_EXAMPLE], kind
    spm_tok = trained["sentencepiece"]
    pieces = [spm_tok.id_to_piece(i) for i in spm_tok.encode([ISSUE_EXAMPLE])[0]]
    assert not any(p.startswith("<0x") for p in pieces), pieces  # "\n" and indentation are pieces, not bytes
    bpe_tok = trained["bpe"]
    assert bpe_tok.piece_to_id("\u010a") >= 0 and bpe_tok.piece_to_id("\u0120\u0120\u0120") >= 0  # "\n", "   "


def assert_lossless(tok, text: str) -> None:
    """decode(encode(text)) == text, and the tokens spell exactly the text's UTF-8 bytes (bits per byte)."""
    ids = tok.encode([text])[0]
    assert tok.decode([ids]) == [text]
    assert int(token_bytes(tok)[ids].sum()) == len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_byte_level_bpe_is_lossless(trained, text):
    assert_lossless(trained["bpe"], text)


@settings(max_examples=200, deadline=None)
@given(text=SPM_TEXTS)
def test_trained_sentencepiece_is_lossless_but_for_its_space_symbol(trained, text):
    assert_lossless(trained["sentencepiece"], text)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_byte_tokenizer_counts_bytes(text):
    assert_lossless(ByteTokenizer(), text)


def test_bits_per_byte_tables_give_specials_nothing(trained):
    for tok in [*trained.values(), ByteTokenizer()]:
        table = token_bytes(tok)
        assert table.shape == (tok.vocab_size,) and table[[tok.bos_id, tok.eos_id, tok.pad_id]].sum() == 0
        assert (table[tok.encode(["héllo wörld"])[0]] > 0).all()


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


def test_bpe_train_save_load_round_trip(tmp_path, corpus):
    tok = train_bpe([corpus[:100_000]], 500, user_defined_symbols=["<sep>"])
    assert tok.vocab_size == 500 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.piece_to_id("<sep>") == 3
    text = "To be, or not to be <sep> </s><s> that is"
    ids = tok.encode([text])[0]
    assert 3 in ids and tok.eos_id not in ids and tok.bos_id not in ids  # written specials are text, symbols not
    assert os.path.basename(tok.save(str(tmp_path))) == "tokenizer.json"
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, HFTokenizer) and again.fingerprint == tok.fingerprint
    assert again.encode([text])[0] == ids and again.decode([ids]) == [text]
    np.testing.assert_array_equal(again.encode_documents(["ab"])[0], [1, *tok.encode(["ab"])[0], 2])
    held_out = corpus[200_000:201_000]
    assert len(tok.encode([held_out])[0]) < len(held_out.encode()) / 1.6  # merges were learned
    with pytest.raises(TokenizerError, match="vocab_size=259: a byte-level BPE needs at least 260"):
        train_bpe(["x"], 259, user_defined_symbols=["<sep>"])


def test_training_is_deterministic(corpus):
    a = train_sentencepiece([corpus[:100_000]], 500)
    b = train_sentencepiece([corpus[:100_000]], 500)
    assert a.fingerprint == b.fingerprint
    assert train_bpe([corpus[:50_000]], 400).fingerprint == train_bpe([corpus[:50_000]], 400).fingerprint


def test_loads_a_model_written_by_sentencepiece_itself(tmp_path, corpus):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(corpus[:100_000], encoding="utf-8")
    prefix = tmp_path / "native"
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix), vocab_size=400,
                                   model_type="unigram", minloglevel=2)
    ours = load_tokenizer(f"{prefix}.model")
    native = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    text = "Now is the winter of our discontent\n  of   York"
    assert ours.encode([text])[0] == native.encode(text)  # its own normalisation, unchanged
    assert ours.decode([native.encode(text)])[0] == native.decode(native.encode(text))
    assert ours.eos_id == native.eos_id() and ours.bos_id == native.bos_id()


def test_byte_tokenizer_and_documents(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(["héllo"])) == ["héllo"]
    (doc,) = tok.encode_documents(["ab"])
    np.testing.assert_array_equal(doc, [tok.bos_id, 97, 98, tok.eos_id])
    tok.save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


def test_directories_prefer_tokenizer_json(tmp_path, trained):
    assert load_hf_directory_tokenizer(str(tmp_path)) is None
    trained["sentencepiece"].save(str(tmp_path))
    assert isinstance(load_hf_directory_tokenizer(str(tmp_path)), SentencePieceTokenizer)
    trained["bpe"].save(str(tmp_path))  # tokenizer.json beside tokenizer.model: the fast tokenizer wins
    assert load_tokenizer(str(tmp_path)).fingerprint == trained["bpe"].fingerprint
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).fingerprint == trained["bpe"].fingerprint


def test_bad_tokenizer_files_name_the_file(tmp_path, trained):
    with pytest.raises(TokenizerError, match="nope.model not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(str(junk))
    with pytest.raises(TokenizerError, match="holds no tokenizer.json, tokenizer.model or tokenizer.bytes"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="expected 'bpe' or 'unigram'"):
        train_sentencepiece(["x"], 100, model_type="wordpiece")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a tokenizers tokenizer.json"):
        load_tokenizer(str(tmp_path))
    trained["bpe"].save(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(TokenizerError, match=r"tokenizer.json: no eos_token in tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' of tokenizer_config.json is not in the vocab"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(str(tmp_path))


def test_model_proto_round_trips_through_bytes(corpus):
    tok = train_sentencepiece([corpus[:50_000]], 500)
    again = SentencePieceTokenizer(io.BytesIO(tok.model_proto).read())
    assert again.encode(["hello"]) == tok.encode(["hello"])


def test_train_tokenizer_tool(tmp_path):
    from helpers import run_cmd

    out = tmp_path / "tok"
    result = run_cmd(["tools/train_tokenizer.py", "--out", str(out), "--vocab-size", "400", "--user-symbols", "<sep>",
                      "data/shakespeare.txt.xz"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bpe, vocab 400" in result.stdout and "bytes/token" in result.stdout
    tok = load_tokenizer(str(out))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400 and tok.piece_to_id("<sep>") == 3
    assert tok.decode(tok.encode([ISSUE_EXAMPLE])) == [ISSUE_EXAMPLE]
    model = tmp_path / "tok.model"
    result = run_cmd(["tools/train_tokenizer.py", "--kind", "sentencepiece", "--out", str(model), "--vocab-size",
                      "400", "data/shakespeare.txt.xz"])
    assert result.returncode == 0 and "sentencepiece bpe, vocab 400" in result.stdout, result.stderr[-2000:]
    assert load_tokenizer(str(model)).decode(load_tokenizer(str(model)).encode([ISSUE_EXAMPLE])) == [ISSUE_EXAMPLE]
    missing = run_cmd(["tools/train_tokenizer.py", "--out", str(out), str(tmp_path / "nope.txt")])
    assert missing.returncode == 2 and "nope.txt' not found" in missing.stderr
