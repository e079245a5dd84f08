"""Opening a Hugging Face checkpoint directory and loading its weights, one tensor (or one shard slice) at a time.

    ckpt = open_hf("Qwen2.5-0.5B")        # config.json, tensor headers and tokenizer checked; no weights read
    ckpt.config, ckpt.tokenizer, ckpt.chat_template
    params = ckpt.load(target)           # device arrays on target's shardings (per-layer or scan layout)
    params = ckpt.load()                 # host numpy tree, per-layer layout, in the stored dtype
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.data.tokenizers import Tokenizer, TokenizerError, load_hf_directory_tokenizer
from lmadapt.files.paths import dir_problem, file_problem
from lmadapt.hf.common import CONFIG_FILE, HFError, read_json
from lmadapt.hf.configs import config_from_hf
from lmadapt.hf.rules import Rule, hf_tensors, rules_for, stacked_path, tree_set
from lmadapt.hf.safetensors_io import FLOAT_DTYPES, TensorInfo, read_tensor, unsupported_dtype, weight_files

# Buffers some checkpoints carry that hold no weights (causal masks, RoPE frequencies): safe to drop.
BUFFERS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.bytes")


def canonical_names(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Stored tensor name -> the name the rules use, without weightless buffers, the tied output matrix that
    tied checkpoints may still carry, and with the `transformer.` prefix original GPT-2 files lack."""
    out = {}
    for name in names:
        if BUFFERS.match(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        canonical = name
        if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            canonical = "transformer." + name
        out[name] = canonical
    return out


def check_tensors(found: Mapping[str, tuple[tuple[int, ...], str]], rules: list[Rule], family: str) -> None:
    """found: canonical name -> (shape, safetensors dtype code). Missing, unexpected, misshapen or non-float
    tensors are an HFError naming them."""
    expected = {name: shape for name, shape, _ in hf_tensors(rules)}
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise HFError(f"missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        # Names come from the file: one with a line break or control character is shown quoted, on one line.
        shown = [n if n.isprintable() else repr(n) for n in unexpected[:5]]
        raise HFError(f"unexpected tensor(s) {', '.join(shown)} for a {family} model; not converted")
    for name, shape in expected.items():
        if tuple(found[name][0]) != shape:
            raise HFError(f"tensor {name}: shape {tuple(found[name][0])}, expected {shape} from config.json")


def stored_dtype(codes: list[str]) -> str:
    """The param dtype that keeps every stored value: bfloat16 when all are, else float32."""
    return "bfloat16" if codes and all(c == "BF16" for c in codes) else "float32"


@dataclasses.dataclass
class HFCheckpoint:
    """A validated HF checkpoint directory; weights are read only by `load`."""

    directory: str
    config: ModelConfig  # param_dtype: the stored dtype (float32 unless every weight is bfloat16)
    hf_config: dict[str, Any]
    tokenizer: Tokenizer | None
    tensors: dict[str, TensorInfo]  # canonical HF name -> where its bytes are
    rules: list[Rule]

    @property
    def chat_template(self) -> str | None:
        """The chat template the checkpoint came with (tokenizer_config.json or chat_template.jinja)."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.chat_template
        jinja = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        path = os.path.join(self.directory, "tokenizer_config.json")
        template = read_json(path).get("chat_template") if os.path.isfile(path) else None
        return template if isinstance(template, str) else None

    def require_tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer; a checkpoint without one is an HFError naming the directory."""
        if self.tokenizer is None:
            raise HFError(f"{self.directory}: no usable tokenizer ({', '.join(_TOKENIZER_FILES)}); a model "
                          f"without its tokenizer cannot be trained or evaluated correctly. Copy the tokenizer files "
                          f"of the original checkpoint into the directory")
        return self.tokenizer

    def load(self, target: Any = None) -> Any:
        """The weights. `target` None: a numpy tree (per-layer layout, the config's param_dtype). Otherwise a
        tree of jax.ShapeDtypeStruct / arrays with `.sharding`, per-layer (`layers_i`) or scan-stacked
        (`layers`): device arrays of those shapes, dtypes and shardings, each process reading from disk only
        the slices its devices hold (one leaf at a time)."""
        reader = _Reader(self)
        if target is None:
            dtype = np.dtype(jax.numpy.dtype(self.config.param_dtype))
            params: dict[str, Any] = {}
            for rule in self.rules:
                tree_set(params, rule.leaf, reader.leaf(rule.leaf, (), dtype))
            return params
        flat, treedef = jax.tree_util.tree_flatten_with_path(target)
        paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
        _check_target(self, dict(zip(paths, (tuple(x.shape) for _, x in flat), strict=True)))
        arrays = []
        for path, (_, leaf) in zip(paths, flat, strict=True):
            sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            dtype = np.dtype(leaf.dtype)
            try:
                arrays.append(jax.make_array_from_callback(
                    tuple(leaf.shape), sharding, lambda index, path=path, dtype=dtype: reader.leaf(path, index, dtype),
                    dtype=dtype))
            except HFError:
                raise
            except Exception as e:
                if (cause := _hf_cause(e)) is None:
                    raise
                raise cause from None
        return jax.tree_util.tree_unflatten(treedef, arrays)


def _hf_cause(e: BaseException) -> HFError | None:
    """The HFError a callback raised, if `e` wraps one (JAX may re-raise a callback's error inside its own, with a
    multi-line traceback text), so the user gets our one line; else None."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, HFError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _check_target(ckpt: HFCheckpoint, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    """The target's leaves must be exactly the checkpoint's, in one of the two layouts."""
    per_layer = {r.leaf: r.lm_shape for r in ckpt.rules}
    if any(p[0] == "layers" for p in shapes):
        expected: dict[tuple[str, ...], tuple[int, ...]] = {}
        for leaf, shape in per_layer.items():
            path, i = stacked_path(leaf)
            expected[path] = (ckpt.config.n_layers, *shape) if i is not None else shape
    else:
        expected = per_layer
    name = lambda p: "/".join(p)
    for path in sorted(set(expected) ^ set(shapes)):
        what = "the target has no leaf" if path in expected else "the checkpoint has no tensor for leaf"
        raise HFError(f"{ckpt.directory}: {what} {name(path)} (a {ckpt.config.family} model)")
    for path, shape in shapes.items():
        if shape != expected[path]:
            raise HFError(f"{ckpt.directory}: leaf {name(path)} has shape {shape} in the target, {expected[path]} "
                          f"in the checkpoint")


class _Reader:
    """Reads leaves (or slices of them) of one checkpoint. It keeps the slices of the leaf being built, so devices
    holding the same slice (replicas) share one read: no more memory than make_array_from_callback, which holds
    every local slice of the leaf until the array is made."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self.by_leaf = {r.leaf: r for r in ckpt.rules}
        self.current: tuple[tuple[str, ...], str] | None = None
        self.slices: dict[tuple[Any, ...], np.ndarray] = {}

    def leaf(self, path: tuple[str, ...], index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        if self.current != (path, dtype.str):
            self.current, self.slices = (path, dtype.str), {}  # a new leaf: let the previous one's slices go
        key = tuple((s.start, s.stop) for s in index)
        if key not in self.slices:
            if path[0] == "layers":  # scan layout: axis 0 is the layer
                full = tuple(index) or (slice(None),)
                layers = range(self.ckpt.config.n_layers)[full[0]]
                value = np.stack([self._read((f"layers_{i}", *path[1:]), full[1:], dtype) for i in layers])
            else:
                value = self._read(path, index, dtype)
            self.slices[key] = value
        return self.slices[key]

    def _read(self, leaf: tuple[str, ...], index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        rule = self.by_leaf[leaf]
        info = self.ckpt.tensors[rule.name]
        return np.asarray(rule.read(lambda hf_index: read_tensor(info, hf_index), index), dtype=dtype)


def _tokenizer(directory: str) -> Tokenizer | None:
    """The directory's own tokenizer (tokenizer.json, tokenizer.model or lmadapt's byte marker), or None."""
    try:
        return load_hf_directory_tokenizer(directory)
    except TokenizerError as e:
        raise HFError(f"{directory}: tokenizer: {e}") from None


def open_hf(directory: str) -> HFCheckpoint:
    """Validate an HF directory without reading its weights: config.json (every unsupported option refused by
    name), the safetensors headers (names, shapes, float dtypes; shards of an index) and the tokenizer (its
    vocabulary must fit the model's). Every problem is one HFError line naming the directory and file or key."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if (problem := dir_problem(directory)) not in (None, "not found"):
        raise HFError(f"{directory} {problem} (expected a Hugging Face checkpoint directory)")
    config_path = os.path.join(directory, CONFIG_FILE)
    if (problem := file_problem(config_path)) is not None:
        raise HFError(f"{directory}: no {CONFIG_FILE}" if problem == "not found" else f"{config_path} {problem}")
    hf_config = read_json(config_path)
    try:
        cfg = config_from_hf(hf_config)
        stored = weight_files(directory)
        names = canonical_names(list(stored), cfg)
        tensors = {canonical: stored[name] for name, canonical in names.items()}
        rules = rules_for(cfg)
        check_tensors({n: (i.shape, i.dtype) for n, i in tensors.items()}, rules, cfg.family)
    except HFError as e:
        msg = str(e)
        raise HFError(msg if msg.startswith(directory) else f"{directory}: {msg}") from None
    for info in tensors.values():
        if info.dtype not in FLOAT_DTYPES:
            raise unsupported_dtype(info)
    cfg = dataclasses.replace(cfg, param_dtype=stored_dtype([i.dtype for i in tensors.values()]))
    tokenizer = _tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens (added tokens included) but "
                      f"config.json vocab_size={cfg.vocab_size}; they do not belong together")
    return HFCheckpoint(directory, cfg, hf_config, tokenizer, tensors, rules)


def import_hf(directory: str) -> tuple[dict[str, Any], ModelConfig, Tokenizer | None]:
    """(numpy params in the per-layer layout and the stored dtype, ModelConfig, tokenizer or None) of a directory."""
    ckpt = open_hf(directory)
    return ckpt.load(), ckpt.config, ckpt.tokenizer


def read_hf_state(directory: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory by their stored names, in their stored dtypes. Pickle is never read."""
    return {name: read_tensor(info) for name, info in weight_files(os.path.abspath(directory)).items()}


def from_hf(state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
    """In memory: HF state dict + config.json dict -> (numpy params in the per-layer layout, ModelConfig).

    Params keep the stored dtype when every tensor is bfloat16 (else float32), as `open_hf`. Raises HFError for
    an unsupported architecture or option, a missing or unexpected tensor, or a wrong shape.
    """
    cfg = config_from_hf(hf_config)
    names = canonical_names(list(state), cfg)
    tensors = {canonical: np.asarray(state[name]) for name, canonical in names.items()}
    codes = {n: {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(t.dtype.name, t.dtype.name)
             for n, t in tensors.items()}
    rules = rules_for(cfg)
    check_tensors({n: (t.shape, codes[n]) for n, t in tensors.items()}, rules, cfg.family)
    for name, code in codes.items():
        if code not in FLOAT_DTYPES:
            raise HFError(f"tensor {name} has dtype {code}, which is not supported (expected float weights)")
        if bad := tensors[name].size - int(np.count_nonzero(np.isfinite(tensors[name]))):
            raise HFError(f"tensor {name}: {bad} of its {tensors[name].size} values are NaN or Inf; refusing to load "
                          f"damaged weights")
    cfg = dataclasses.replace(cfg, param_dtype=stored_dtype(list(codes.values())))
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    params: dict[str, Any] = {}
    for rule in rules:
        tree_set(params, rule.leaf, np.asarray(rule.from_hf(tensors[rule.name]), dtype=dtype))
    return params, cfg
