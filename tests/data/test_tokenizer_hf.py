"""Hugging Face tokenizers against transformers' AutoTokenizer: `kind: hf` imports (byte-level BPE
tokenizer.json files built offline like Llama 3's and Qwen2's) and lmadapt's exports of every kind."""

import io
import json
import lzma
import os
import warnings

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ISSUE_EXAMPLE, PIECES, ROOT
from lmadapt.config import TokenizerConfig
from lmadapt.data.pipeline import resolve_tokenizer
from lmadapt.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_hf_directory_tokenizer,
    load_tokenizer,
    save_hf_tokenizer,
    train_bpe,
    train_sentencepiece,
)
from lmadapt.data.tokenizers.hf import LLAMA3_PATTERN
from lmadapt.eval.scoring import token_bytes

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
            "<|eot_id|>{% endfor %}")
BATTERY = [ISSUE_EXAMPLE, "\tif a:\r\n\t\treturn  'x'\n\n\n", "   lead", "trail   ", "a  b   c    d", "", " ", "\n",
           "Hello, World! 1234567", "caf\u00e9 e\u0301 \u6f22\u5b57 \U0001F600 \U0001F469\u200d\U0001F467",
           "<|end_of_text|> <|begin_of_text|>x<|eot_id|>", "<s></s><pad><unk> <0x0A>", "\u00a0\u3000\ufb01\uff21",
           "\u2581\u0120\u010a", "x" * 200 + " " * 30 + "\t" * 5]
TEXTS = st.one_of(st.lists(st.sampled_from(PIECES + ["<|end_of_text|>", "<|eot_id|>"]), max_size=30).map("".join),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    with lzma.open(os.path.join(ROOT, "data", "python_docs.txt.xz"), "rt", encoding="utf-8") as f:
        docs = f.read(150_000)
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        return [docs, f.read(100_000)]


def _byte_level_bpe(texts: list[str], specials: list[str]) -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, texts) -> str:
    """A Llama-3-shaped tokenizer directory: the post-processor prepends <|begin_of_text|>; a chat template."""
    tok = _byte_level_bpe(texts, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                  "<|eot_id|>"])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>", chat_template=TEMPLATE)
    directory = str(tmp_path_factory.mktemp("llama3"))
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, texts) -> str:
    """A Qwen2-shaped one: no bos, pad = eos, special tokens written as AddedToken dicts."""
    tok = _byte_level_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    directory = str(tmp_path_factory.mktemp("qwen"))
    fast.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    entry = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False}
    config.update(eos_token=entry("<|im_end|>"), pad_token=entry("<|endoftext|>"), bos_token=None)
    with open(path, "w") as f:
        json.dump(config, f)
    return directory


def _auto(directory: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(directory)


def assert_same_ids(tok, auto, strings):
    for text in strings:
        assert tok.encode([text])[0] == auto(text, add_special_tokens=False)["input_ids"], repr(text)


def test_kind_hf_encodes_as_auto_tokenizer(llama3_dir, qwen_dir):
    for directory in (llama3_dir, qwen_dir):
        tok, auto = load_tokenizer(directory), _auto(directory)
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(auto)
        assert_same_ids(tok, auto, BATTERY)
        with_specials = auto("hello", add_special_tokens=True)["input_ids"]
        assert with_specials == ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(["hello"])[0]
        plain = [t for t in BATTERY if "<|" not in t]
        assert tok.decode(tok.encode(plain)) == plain  # byte-level BPE: lossless
        # Specials written in the text are split out as transformers does; decoding drops only bos/eos/pad.
        assert tok.decode(tok.encode(["x<|eot_id|><|im_start|>y"])) == ["x<|eot_id|><|im_start|>y"]


def test_kind_hf_reads_specials_and_chat_template(llama3_dir, qwen_dir):
    llama = resolve_tokenizer(TokenizerConfig(kind="hf", path=llama3_dir), {}, None)
    backend = llama.backend
    assert (llama.bos_id, llama.eos_id) == (backend.token_to_id("<|begin_of_text|>"),
                                            backend.token_to_id("<|end_of_text|>"))
    assert llama.pad_id == llama.eos_id and llama.chat_template == TEMPLATE
    qwen = load_tokenizer(os.path.join(qwen_dir, "tokenizer.json"))
    assert qwen.bos_id == -1 and qwen.eos_id == qwen.backend.token_to_id("<|im_end|>")
    assert qwen.pad_id == qwen.backend.token_to_id("<|endoftext|>") and qwen.chat_template is None
    assert list(qwen.encode_documents(["a"])[0]) == [*qwen.encode(["a"])[0], qwen.eos_id]
    assert llama.fingerprint != qwen.fingerprint and llama.fingerprint == load_tokenizer(llama3_dir).fingerprint


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_kind_hf_matches_auto_tokenizer_on_any_text(llama3_dir, text):
    tok, auto = _cached(llama3_dir)
    ids = tok.encode([text])[0]
    assert ids == auto(text, add_special_tokens=False)["input_ids"]
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    assert int(token_bytes(tok)[ids].sum()) == len(text.encode()) - sum(
        len(tok.backend.id_to_token(i).encode()) for i in ids if i in specials)


_CACHE: dict = {}


def _cached(directory: str):
    if directory not in _CACHE:
        _CACHE[directory] = load_tokenizer(directory), _auto(directory)
    return _CACHE[directory]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, texts, llama3_dir) -> dict:
    """Every kind lmadapt holds, exported with save_hf_tokenizer: {kind: (tokenizer, directory)}."""
    out = {}
    native = io.BytesIO()  # a SentencePiece model with SentencePiece's defaults (NFKC, dummy prefix), as Llama 2's
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[1].splitlines()), model_writer=native, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    for kind, tok in {"bytes": ByteTokenizer(), "bpe": train_bpe(texts, 700, user_defined_symbols=["<sep>"]),
                      "sentencepiece": train_sentencepiece(texts, 700, user_defined_symbols=["<sep>"]),
                      "sentencepiece-nfkc": SentencePieceTokenizer(native.getvalue()),
                      "hf": load_tokenizer(llama3_dir)}.items():
        directory = str(tmp_path_factory.mktemp(f"export-{kind}"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = save_hf_tokenizer(tok, directory, model_max_length=256)
        # Only the NFKC model is inexact (combining marks in the probe battery), and it says so.
        assert any("converts nearly" in str(w.message) for w in caught) == (kind == "sentencepiece-nfkc")
        assert {"tokenizer.json", "tokenizer_config.json"} <= {os.path.basename(f) for f in files}
        out[kind] = tok, directory
    return out


KINDS = ["bytes", "bpe", "sentencepiece", "sentencepiece-nfkc", "hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_export_encodes_as_lmadapt_did(exported, kind):
    tok, directory = exported[kind]
    auto = _auto(directory)
    assert_same_ids(tok, auto, BATTERY + ["a<sep>b <sep>\n<sep>"])
    head = [tok.bos_id] if tok.bos_id >= 0 else []
    assert auto("hello", add_special_tokens=True)["input_ids"] == head + tok.encode(["hello"])[0]
    assert (auto.eos_token_id, auto.model_max_length) == (tok.eos_id, 256)
    assert auto.chat_template == tok.chat_template
    again = load_hf_directory_tokenizer(directory)  # importing the export gives back the same tokenizer
    assert type(again) is type(tok) and again.fingerprint == tok.fingerprint
    if isinstance(tok, SentencePieceTokenizer):
        assert os.path.isfile(os.path.join(directory, "tokenizer.model"))


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_exports_match_on_any_text(exported, text):
    for kind in ("bytes", "bpe", "sentencepiece"):
        tok, directory = exported[kind]
        _, auto = _cached(directory)
        assert tok.encode([text])[0] == auto(text, add_special_tokens=False)["input_ids"], kind


def test_a_changed_export_is_read_as_its_tokenizer_json(exported, tmp_path):
    tok, directory = exported["sentencepiece"]
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"][0]["content"] = spec["added_tokens"][0]["content"]  # same meaning, other bytes
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, indent=1))
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, HFTokenizer) and again.encode(BATTERY) == tok.encode(BATTERY)
    np.testing.assert_array_equal(token_bytes(again), token_bytes(tok))  # "\u2581" and <0x..> pieces counted alike
    # kind hf takes any Hugging Face tokenizer directory, also one with only tokenizer.model.
    for name in ("tokenizer.json", "lmadapt_tokenizer.json"):
        os.remove(tmp_path / name)
    model_only = resolve_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path)), {}, None)
    assert isinstance(model_only, SentencePieceTokenizer) and model_only.fingerprint == tok.fingerprint


def test_an_inexact_sentencepiece_conversion_is_refused(exported, tmp_path, monkeypatch):
    from lmadapt.data.tokenizers import export as tokenizer_export

    tok, _ = exported["sentencepiece"]
    monkeypatch.setattr(tokenizer_export, "sentencepiece_tokenizer_json",
                        lambda t: tokenizer_export.byte_tokenizer_json(ByteTokenizer()))
    with pytest.raises(TokenizerError, match="encodes 'def f.* as .* where lmadapt gives"):
        save_hf_tokenizer(tok, str(tmp_path))
    assert not os.path.exists(tmp_path / "tokenizer.json")
