"""Hugging Face `tokenizers` tokenizers: any `tokenizer.json` (Llama 3, Qwen, Mistral, Gemma, GPT-2 ...) with
its special tokens and chat template from `tokenizer_config.json`, encoding exactly as `transformers`'
`AutoTokenizer` does; and the lossless byte-level BPE lmadapt trains (the scheme of GPT-2, Llama 3 and Qwen).

Such a tokenizer is identified by the bytes of its tokenizer.json and the special ids lmadapt adds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from lmadapt.data.tokenizers.base import HF_CONFIG_FILE, HF_TOKENIZER_FILE, Tokenizer, TokenizerError, write_atomic
from lmadapt.files import paths
from lmadapt.files.paths import file_problem, open_regular, special_problem

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.47 saves a single chat template
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# Llama 3's pre-tokenizer split (Qwen2 uses it with single digits): letters, up to 3 digits, punctuation with its
# newlines, newline runs, and whitespace runs kept whole except the space before a word.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # for comparison
BPE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of the byte-level BPE lmadapt trains


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict (AddedToken) with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode map: {character a byte-level token uses: the byte it stands for}.

    Printable Latin-1 bytes stand for themselves; the others, in order, for U+0100 onwards."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in out.values():
            out[chr(256 + extra)] = b
            extra += 1
    assert set(out) == set(alphabet)
    return out


def _components(node: Any) -> list[dict[str, Any]]:
    """Every component (itself or inside a Sequence) of one part of a tokenizer.json."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or node.get("processors")
    return [c for sub in inner for c in _components(sub)] if inner else [node]


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json plus the tokenizer_config.json settings transformers reads with it.

    `bos_id` is the token the tokenizer's post-processor prepends to a text (-1 when it prepends none, as
    for Qwen), as `AutoTokenizer(text)` does with transformers 5; eos is `eos_token` (required); pad is
    `pad_token`, else eos. `encode` adds no special tokens, like `AutoTokenizer(text, add_special_tokens=False)`.
    """

    _token_bytes: np.ndarray | None = None

    def __init__(self, tokenizer_json: bytes, config: dict[str, Any] | None = None, origin: str = "<memory>"):
        try:
            self._tok = _Backend.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            why = (str(e).splitlines() or [""])[0][:200]
            raise TokenizerError(f"{origin}: not a tokenizers tokenizer.json ({why})") from None
        self._json, self.origin = tokenizer_json, origin
        self.config = dict(config or {})
        self.chat_template = pick_chat_template(self.config.get("chat_template"))
        # transformers resets padding/truncation baked into tokenizer.json unless asked, and splits special tokens
        # found in text unless `split_special_tokens` says to encode them as text.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id("eos_token", required=True)
        pad = self._special_id("pad_token")
        self.pad_id = self.eos_id if pad < 0 else pad
        self.bos_id = self._prepended_id()
        specials = json.dumps([self.bos_id, self.eos_id, self.pad_id, self._tok.encode_special_tokens]).encode()
        self.fingerprint = "hf-" + hashlib.sha256(tokenizer_json + b"\0" + specials).hexdigest()[:32]

    def _special_id(self, key: str, required: bool = False) -> int:
        content = _token_content(self.config.get(key))
        if content is None:
            if required:
                raise TokenizerError(f"{self.origin}: no {key} in {HF_CONFIG_FILE} (or {SPECIAL_TOKENS_MAP_FILE}); "
                                     f"lmadapt ends every document with one")
            return -1
        i = self._tok.token_to_id(content)
        if i is None:
            raise TokenizerError(f"{self.origin}: {key} {content!r} of {HF_CONFIG_FILE} is not in the vocabulary")
        return i

    def _prepended_id(self) -> int:
        """What the post-processor puts before a single text (transformers 5 follows it, not add_bos_token)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        head = next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
        if len(head) > 1:
            raise TokenizerError(f"{self.origin}: the post-processor prepends {len(head)} tokens to a text; lmadapt "
                                 f"supports one (bos) or none")
        return head[0] if head else -1

    @property
    def tokenizer_json(self) -> bytes:
        """The canonical bytes of tokenizer.json (what `save` writes and the fingerprint hashes)."""
        return self._json

    @property
    def backend(self) -> _Backend:
        return self._tok

    def id_to_piece(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of a token (as tokenizer.json spells it, e.g. "Ġthe"), -1 if there is none."""
        i = self._tok.token_to_id(piece)
        return -1 if i is None else i

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast (no offsets): tokenizers 0.21+
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        # Only the ids lmadapt inserts are dropped: other special tokens may have come from the text itself.
        inserted = {self.bos_id, self.eos_id, self.pad_id}
        rows = [[int(i) for i in row if int(i) not in inserted] for row in ids]
        return self._tok.decode_batch(rows, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        if self._token_bytes is None:  # a 150k vocabulary takes about a second: once
            self._token_bytes = self._count_token_bytes()
        return self._token_bytes.copy()

    def _count_token_bytes(self) -> np.ndarray:
        spec = json.loads(self._json)
        byte_level = any(c.get("type") == "ByteLevel" for part in ("pre_tokenizer", "decoder")
                         for c in _components(spec.get(part)))
        byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
        to_byte = byte_decoder()
        added = self._tok.get_added_tokens_decoder()
        table = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i in added:  # added specials spell nothing; other added tokens stand for their text
                table[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            piece = self._tok.id_to_token(i)
            if piece is None:
                continue
            if byte_level:
                table[i] = sum(1 if c in to_byte else len(c.encode("utf-8")) for c in piece)
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table[i] = 1
            else:  # SentencePiece-style: "▁" stands for a space
                table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def save(self, directory: str) -> str:
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomic(os.path.join(directory, HF_CONFIG_FILE),
                     (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        return write_atomic(os.path.join(directory, HF_TOKENIZER_FILE), self._json)


def pick_chat_template(value: Any) -> str | None:
    """A chat_template entry: a string, or the legacy list of {"name", "template"} (the "default" one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    value = paths.read_json(path, TokenizerError)
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tokenizer_config(directory: str) -> dict[str, Any]:
    """tokenizer_config.json of `directory` ({} if none), with special tokens missing from it taken from
    special_tokens_map.json and the chat template from chat_template.jinja, which transformers prefers."""
    for name in (HF_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE):
        # Skipping a pipe or device here would load the tokenizer without its special tokens or template.
        if (problem := special_problem(os.path.join(directory, name))) is not None:
            raise TokenizerError(f"{os.path.join(directory, name)} {problem}")
    path = os.path.join(directory, HF_CONFIG_FILE)
    config = _read_json(path) if os.path.isfile(path) else {}
    map_path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    if os.path.isfile(map_path):
        for key, value in _read_json(map_path).items():
            config.setdefault(key, value)
    template = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return config


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """Load a tokenizer.json (`path` is the file or a directory holding it) with the tokenizer_config.json beside it."""
    file = os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path
    if (problem := file_problem(file)) is not None:
        raise TokenizerError(f"tokenizer file {file!r} {problem}")
    with open_regular(file, TokenizerError) as f:
        data = f.read()
    return HFTokenizer(data, read_tokenizer_config(os.path.dirname(os.path.abspath(file))), origin=file)


def train_bpe(texts: Iterable[str], vocab_size: int, *, user_defined_symbols: Sequence[str] = (),
              min_frequency: int = 2, pattern: str = LLAMA3_PATTERN) -> HFTokenizer:
    """Train a byte-level BPE (Llama 3's pre-tokenizer split, GPT-2's byte alphabet): lossless for every text.

    Ids: 0 <pad>, 1 <s> (bos), 2 </s> (eos), then the user-defined symbols (matched whole in text), the 256
    bytes, then the merges. Special tokens written in a text are encoded as text (`split_special_tokens`),
    so no document can fake an eos. Fewer merges than asked are learned when the texts run out of pairs.
    `pattern` is the pre-tokenizer split (GPT2_PATTERN for GPT-2's).
    """
    symbols = list(dict.fromkeys(user_defined_symbols))
    floor = len(BPE_SPECIALS) + len(symbols) + 256
    if vocab_size < floor:
        raise TokenizerError(f"tokenizer.vocab_size={vocab_size}: a byte-level BPE needs at least {floor} "
                             f"({len(BPE_SPECIALS)} specials + {len(symbols)} user symbols + 256 bytes)")
    tok = _Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # User symbols train as specials (ids right after bos/eos/pad), then become plain added tokens: text.
    added = [AddedToken(t, special=True, normalized=False) for t in (*BPE_SPECIALS, *symbols)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=added, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    try:
        tok.train_from_iterator(texts, trainer)
    except Exception as e:  # a bare Exception from Rust
        raise TokenizerError(f"training a byte-level BPE with vocab_size={vocab_size} failed: {e}") from None
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] in BPE_SPECIALS
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
              "split_special_tokens": True, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    return HFTokenizer(json.dumps(spec, ensure_ascii=False).encode("utf-8"), config, origin="<trained>")
