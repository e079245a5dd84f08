"""Hugging Face interchange: lmadapt params <-> `LlamaForCausalLM` / `GPT2LMHeadModel` weights and config.

    state, hf_config = to_hf(params, cfg)              # in memory: numpy state dict + config.json dict
    params, cfg = from_hf(state, hf_config)
    export_hf("out/hf", params, cfg, tokenizer)        # a directory `from_pretrained` loads
    params, cfg, tokenizer = import_hf("out/hf")

`lmadapt.model` is parameterised as Hugging Face is (RoPE with `rotate_half` pairing, tanh GELU, RMSNorm/LayerNorm
eps, grouped-query heads as `repeat_kv`), so conversion is renaming, reshaping and transposing alone. Only
safetensors is read or written (never pickle), through `safetensors.numpy`, so neither torch nor transformers is
needed here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lmadapt.config import ModelConfig
from lmadapt.model import init_params
from lmadapt.tokenizer import BYTES_FILE, TOKENIZER_FILE, SentencePieceTokenizer, Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_ARCH = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
# Buffers some checkpoints carry that hold no weights (causal masks, RoPE frequencies): safe to drop.
_BUFFERS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # same function as jax.nn.gelu(approximate=True)


class HFError(ValueError):
    """A Hugging Face checkpoint or config that cannot be converted; the message names the file, key or tensor."""


# ---- In memory ---------------------------------------------------------------------------------------------------


def _plain(params: Any) -> dict[str, Any]:
    """Unboxed numpy tree in the unstacked (layers_i) layout, whatever the input layout."""
    params = dict(jax.device_get(nn.unbox(params)))
    if "layers" in params:  # scan_layers: split the leading layer axis
        stacked = params.pop("layers")
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return jax.tree.map(np.asarray, params)


def _hf_state(p: dict[str, Any], cfg: ModelConfig, cat: Any = np.concatenate) -> dict[str, Any]:
    """The HF tensors of per-layer params, by renaming, reshaping and transposing (numpy or, for shapes, jax)."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    state: dict[str, Any] = {}
    if cfg.family == "llama":
        state["model.embed_tokens.weight"] = p["embed"]["embedding"]
        for i in range(cfg.n_layers):
            lp, pre = p[f"layers_{i}"], f"model.layers.{i}."
            a, m = lp["attn"], lp["mlp"]
            state[pre + "input_layernorm.weight"] = lp["attn_norm"]["scale"]
            # HF Linear weights are [out, in]; our q/k/v kernels are [in, heads, head_dim].
            state[pre + "self_attn.q_proj.weight"] = a["q"]["kernel"].reshape(d, h * hd).T
            state[pre + "self_attn.k_proj.weight"] = a["k"]["kernel"].reshape(d, kv * hd).T
            state[pre + "self_attn.v_proj.weight"] = a["v"]["kernel"].reshape(d, kv * hd).T
            state[pre + "self_attn.o_proj.weight"] = a["o"]["kernel"].reshape(h * hd, d).T
            state[pre + "post_attention_layernorm.weight"] = lp["mlp_norm"]["scale"]
            state[pre + "mlp.gate_proj.weight"] = m["gate"]["kernel"].T
            state[pre + "mlp.up_proj.weight"] = m["up"]["kernel"].T
            state[pre + "mlp.down_proj.weight"] = m["down"]["kernel"].T
        state["model.norm.weight"] = p["final_norm"]["scale"]
        if not cfg.tie_embeddings:
            state["lm_head.weight"] = p["lm_head"]["kernel"].T
        return state
    # GPT-2 (to_hf has rejected any other family)
    state["transformer.wte.weight"] = p["embed"]["embedding"]
    state["transformer.wpe.weight"] = p["pos_embed"]["embedding"]
    for i in range(cfg.n_layers):
        lp, pre = p[f"layers_{i}"], f"transformer.h.{i}."
        a, m = lp["attn"], lp["mlp"]
        state[pre + "ln_1.weight"], state[pre + "ln_1.bias"] = lp["attn_norm"]["scale"], lp["attn_norm"]["bias"]
        # GPT-2's Conv1D weights are [in, out] (our layout); c_attn is q, k, v side by side.
        state[pre + "attn.c_attn.weight"] = cat([a[n]["kernel"].reshape(d, d) for n in "qkv"], 1)
        state[pre + "attn.c_attn.bias"] = cat([a[n]["bias"].reshape(d) for n in "qkv"])
        state[pre + "attn.c_proj.weight"] = a["o"]["kernel"].reshape(d, d)
        state[pre + "attn.c_proj.bias"] = a["o"]["bias"]
        state[pre + "ln_2.weight"], state[pre + "ln_2.bias"] = lp["mlp_norm"]["scale"], lp["mlp_norm"]["bias"]
        state[pre + "mlp.c_fc.weight"], state[pre + "mlp.c_fc.bias"] = m["up"]["kernel"], m["up"]["bias"]
        state[pre + "mlp.c_proj.weight"], state[pre + "mlp.c_proj.bias"] = m["down"]["kernel"], m["down"]["bias"]
    state["transformer.ln_f.weight"] = p["final_norm"]["scale"]
    state["transformer.ln_f.bias"] = p["final_norm"]["bias"]
    return state


def to_hf(params: Any, cfg: ModelConfig, dtype: str = "float32", *, bos_id: int | None = None,
          eos_id: int | None = None, pad_id: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """lmadapt params (plain or boxed; per-layer or scan-stacked) -> (HF state dict, HF config.json dict).

    `dtype` ("float32" or "bfloat16") is the dtype of every exported tensor and of the config's `dtype`;
    special ids (negative or None: absent) go into the config.
    """
    if dtype not in _DTYPES:
        raise HFError(f"export dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    if cfg.family == "llama":
        config: dict[str, Any] = {
            "model_type": "llama", "hidden_size": d, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": h, "num_key_value_heads": kv, "head_dim": hd, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            # transformers >= 5 reads rope_parameters, older versions rope_theta; each ignores the other.
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None, "attention_bias": False, "mlp_bias": False}
    elif cfg.family == "gpt2":
        if hd * h != d or kv != h or not cfg.tie_embeddings:
            raise HFError(f"GPT-2 needs head_dim * n_heads == d_model, no grouped-query heads and tied embeddings; "
                          f"got d_model={d}, n_heads={h}, n_kv_heads={kv}, head_dim={hd}, "
                          f"tie_embeddings={cfg.tie_embeddings}")
        config = {
            "model_type": "gpt2", "n_embd": d, "n_layer": cfg.n_layers, "n_head": h, "n_positions": cfg.max_seq_len,
            "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    else:
        raise HFError(f"model family {cfg.family!r}: expected 'llama' or 'gpt2'")
    config.update({"architectures": [_ARCH[cfg.family]], "vocab_size": cfg.vocab_size,
                   "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
                   "dtype": dtype, "torch_dtype": dtype})  # "torch_dtype": the name before transformers 5
    for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
        if value is not None and value >= 0:
            config[key] = int(value)
    out = _DTYPES[dtype]
    state = _hf_state(_plain(params), cfg)
    return {k: np.ascontiguousarray(v.astype(np.float32).astype(out)) for k, v in state.items()}, config


def _num(hf: Mapping[str, Any], key: str, kind: type = int, default: Any = None) -> Any:
    """config.json[key] as a positive int/float; missing (without default) or anything else is an HFError."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise HFError(f"config.json: missing {key!r}")
        return default
    # JSON allows NaN and Infinity (json.load reads them), and sizes feed int32 shapes and indices.
    if (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            or (isinstance(value, float) and not math.isfinite(value))
            or (kind is int and (value % 1 or value >= 2**31))):
        what = "integer below 2**31" if kind is int else "finite number"
        raise HFError(f"config.json: {key}={value!r} is not a positive {what}")
    return kind(value)


def _default_rope(rope: Any) -> bool:
    return not rope or (isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) == "default")


def _config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Validate an HF config.json dict and translate it; every unsupported feature is refused by name."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in _ARCH:
        raise HFError(f"config.json: model_type {model_type!r} is not supported (expected 'llama' or 'gpt2')")
    archs = hf.get("architectures") or [_ARCH[model_type]]
    if not isinstance(archs, list) or archs != [_ARCH[model_type]]:
        raise HFError(f"config.json: architectures {archs} not supported; expected [{_ARCH[model_type]!r}]")
    rope = hf.get("rope_parameters") or {}
    checks = {  # key -> (supported?, what is): each feature model.py does not implement
        "llama": [("attention_bias", not hf.get("attention_bias"), "false"),
                  ("mlp_bias", not hf.get("mlp_bias"), "false"),
                  ("hidden_act", hf.get("hidden_act", "silu") == "silu", "'silu'"),
                  ("rope_scaling", _default_rope(hf.get("rope_scaling")), "null: RoPE scaling is not implemented"),
                  ("rope_parameters", _default_rope(rope), "rope_type 'default': RoPE scaling is not implemented")],
        "gpt2": [("activation_function", hf.get("activation_function", "gelu_new") in _TANH_GELU,
                  " or ".join(_TANH_GELU)),
                 ("scale_attn_weights", hf.get("scale_attn_weights", True), "true"),
                 ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"), "false"),
                 ("add_cross_attention", not hf.get("add_cross_attention"), "false"),
                 ("tie_word_embeddings", hf.get("tie_word_embeddings", True), "true")],
    }[model_type]
    for key, ok, expected in checks:
        if not ok:
            raise HFError(f"config.json: {key}={hf.get(key)!r} is not supported (expected {expected})")
    common = {"vocab_size": _num(hf, "vocab_size"), "init_std": _num(hf, "initializer_range", float, 0.02),
              "param_dtype": "float32", "dtype": "float32"}
    if model_type == "llama":
        d, heads = _num(hf, "hidden_size"), _num(hf, "num_attention_heads")
        kv, head_dim = _num(hf, "num_key_value_heads", int, heads), _num(hf, "head_dim", int, d // heads)
        if heads % kv or head_dim % 2:
            raise HFError(f"config.json: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv} "
                          f"and head_dim={head_dim} even")
        theta = _num(rope, "rope_theta", float, 0.0) or _num(hf, "rope_theta", float, 10000.0)
        return ModelConfig(family="llama", d_model=d, n_layers=_num(hf, "num_hidden_layers"), n_heads=heads,
                           n_kv_heads=None if kv == heads else kv, head_dim=None if head_dim * heads == d else head_dim,
                           d_ff=_num(hf, "intermediate_size"), max_seq_len=_num(hf, "max_position_embeddings"),
                           rope_theta=theta, norm_eps=_num(hf, "rms_norm_eps", float, 1e-6),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **common)
    d, heads = _num(hf, "n_embd"), _num(hf, "n_head")
    if d % heads:
        raise HFError(f"config.json: n_embd={d} is not a multiple of n_head={heads}")
    return ModelConfig(family="gpt2", d_model=d, n_layers=_num(hf, "n_layer"), n_heads=heads,
                       d_ff=_num(hf, "n_inner", int, 4 * d), max_seq_len=_num(hf, "n_positions"),
                       norm_eps=_num(hf, "layer_norm_epsilon", float, 1e-5), tie_embeddings=True, **common)


def _normalise_names(state: Mapping[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Drop weightless buffers; give GPT-2 names the `transformer.` prefix that original checkpoints lack."""
    out = {}
    for name, value in state.items():
        if _BUFFERS.match(name):
            continue
        if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = value
    return out


def from_hf(state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
    """HF state dict + config.json dict -> (float32 numpy params in the per-layer layout, ModelConfig).

    Raises HFError for an unsupported architecture or feature, a missing or unexpected tensor, or a wrong shape.
    """
    cfg = _config_from_hf(hf_config)
    state = _normalise_names(state, cfg.family)
    template = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0), seq_len=1)))
    forward = lambda p: _hf_state(p, cfg, jnp.concatenate)
    expected = {name: tuple(x.shape) for name, x in jax.eval_shape(forward, template).items()}
    if cfg.tie_embeddings:  # tied checkpoints may still carry the (identical) output matrix
        state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise HFError(f"missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise HFError(f"unexpected tensor(s) {', '.join(unexpected[:5])} for a {cfg.family} model; not converted")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise HFError(f"tensor {name}: shape {tuple(state[name].shape)}, expected {shape} from config.json")
    # `_hf_state` only moves values (reshape, transpose, concatenate): a permutation, whose linear transpose is
    # its exact inverse. Deriving the import from the export keeps the two directions from ever drifting apart.
    (params,) = jax.linear_transpose(forward, template)({k: np.asarray(v, np.float32) for k, v in state.items()})
    return jax.tree.map(np.asarray, params), cfg


# ---- Files -------------------------------------------------------------------------------------------------------


def export_hf(directory: str, params: Any, cfg: ModelConfig, tokenizer: Tokenizer | None = None,
              dtype: str = "float32", bos_id: int | None = None, eos_id: int | None = None) -> str:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads; return its path.

    Writes model.safetensors, config.json, generation_config.json (when special ids are known) and the tokenizer:
    a SentencePiece model as tokenizer.model + tokenizer_config.json (LlamaTokenizer, best effort), the byte
    tokenizer as lmadapt's tokenizer.bytes marker (no transformers equivalent). Special ids default to the
    tokenizer's. Everything is written into a temporary sibling then renamed, so a crash leaves no half directory;
    an existing non-empty `directory` is refused.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise HFError(f"{directory}: exists and is not an empty directory; refusing to overwrite")
    if tokenizer is not None:
        bos_id = tokenizer.bos_id if bos_id is None else bos_id
        eos_id = tokenizer.eos_id if eos_id is None else eos_id
    pad_id = tokenizer.pad_id if tokenizer is not None else None
    state, config = to_hf(params, cfg, dtype, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})  # "pt": what HF expects
        _write_json(os.path.join(tmp, CONFIG_FILE), config)
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        if ids:
            _write_json(os.path.join(tmp, "generation_config.json"), {"_from_model_config": True, **ids})
        if tokenizer is not None:
            tokenizer.save(tmp)
            if isinstance(tokenizer, SentencePieceTokenizer):
                _write_json(os.path.join(tmp, "tokenizer_config.json"), _tokenizer_config(tokenizer, cfg))
        os.replace(tmp, directory)  # rename(2) replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _tokenizer_config(tok: SentencePieceTokenizer, cfg: ModelConfig) -> dict[str, Any]:
    piece = lambda i: tok.id_to_piece(i) if 0 <= i < tok.vocab_size else None
    unk = tok.piece_to_id("<unk>")
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
            "unk_token": piece(unk) if unk >= 0 else None, "pad_token": piece(tok.pad_id),
            "add_bos_token": tok.bos_id >= 0, "add_eos_token": False, "legacy": False,
            "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len, "sp_model_kwargs": {}}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HFError(f"{path}: expected a JSON object")
    return obj


def _load_weights(path: str) -> dict[str, np.ndarray]:
    """One safetensors file; a truncated or foreign file is an HFError naming it (not the library's own error)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise HFError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def read_hf_state(directory: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory: model.safetensors or the shards its index names. Pickle is refused."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        return _load_weights(single)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index}: no 'weight_map' object")
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            # Shards must sit beside the index: a name like "../x" would read outside the checkpoint.
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
                raise HFError(f"{index}: shard {shard!r} is not a file in {directory}")
            state.update(_load_weights(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise HFError(f"{index}: tensor(s) {', '.join(missing[:5])} listed but not in any shard")
        return state
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise HFError(f"{directory}: only safetensors weights are accepted ({WEIGHTS_FILE} or {INDEX_FILE}); "
                      "pickle files (pytorch_model.bin) are never loaded. Re-save with "
                      "save_pretrained(..., safe_serialization=True)")
    raise HFError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def import_hf(directory: str) -> tuple[dict[str, Any], ModelConfig, Tokenizer | None]:
    """Read an HF directory (config.json + safetensors weights, tokenizer.model if present) -> (params, cfg, tok)."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise HFError(f"{directory}: no {CONFIG_FILE}")
    hf_config = _read_json(config_path)
    state = read_hf_state(directory)
    try:
        params, cfg = from_hf(state, hf_config)
    except HFError as e:  # from_hf sees dicts only: say which directory the tensors and config came from
        raise HFError(f"{directory}: {e}") from None
    has_tokenizer = any(os.path.isfile(os.path.join(directory, n)) for n in (TOKENIZER_FILE, BYTES_FILE))
    return params, cfg, load_tokenizer(directory) if has_tokenizer else None


# ---- Plain dumps of lmadapt params -------------------------------------------------------------------------------


def save_safetensors_dump(path: str, params: Any, dtype: str | None = None) -> str:
    """Write params (any layout) as one safetensors file keyed by "/"-joined paths ("layers_0/attn/q/kernel").

    dtype None keeps each leaf's dtype (the round trip is then exact); "float32"/"bfloat16" casts every leaf.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise HFError(f"dump dtype {dtype!r}: expected None or one of {sorted(_DTYPES)}")
    target = (lambda x: x) if dtype is None else (lambda x: x.astype(_DTYPES[dtype]))
    flat = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(nn.unbox(params))):
        name = jax.tree_util.keystr(keys, simple=True, separator="/")
        if name.count("/") != len(keys) - 1:  # a "/" inside a name would split differently on load
            raise HFError(f"param {name!r}: a name contains '/', the dump's separator")
        flat[name] = np.ascontiguousarray(target(np.asarray(leaf)))
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata={"format": "lmadapt-params"})
    os.replace(tmp, path)
    return path


def load_safetensors_dump(path: str) -> dict[str, Any]:
    """The nested numpy params tree written by `save_safetensors_dump`."""
    params: dict[str, Any] = {}
    for name, value in load_file(path).items():
        node = params
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
