"""config.json <-> ModelConfig for every family (lmadapt/families.py).

Import reads what each family's transformers class reads, with that class's defaults for missing keys, and
refuses by name every option set to a value that changes the math and that lmadapt does not implement (one line:
`config.json: <key>=<value> is not supported (expected ...)`). Dropout rates and other training-only or
cache-only keys do not change the function and are ignored, as transformers ignores them at inference.
Export writes a config.json the family's transformers class loads with the same math.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmadapt.config import ModelConfig
from lmadapt.families import FAMILIES
from lmadapt.hf.common import DTYPES, HFError
from lmadapt.hf.rope_config import rope_from_hf, rope_to_hf
from lmadapt.hf.values import flag, number, optional_number, refuse, require

_FAMILY_OF_TYPE = {f.hf_model_type: name for name, f in FAMILIES.items()}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both jax.nn.gelu(approximate=True)
FULL, SLIDING = "full_attention", "sliding_attention"
# transformers' class defaults for the keys a config.json may leave out (None: derived from other sizes).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192, "sliding_window": 4096,
               "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
}


def _family(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in _FAMILY_OF_TYPE:
        raise HFError(f"config.json: model_type {model_type!r} is not supported (expected one of "
                      f"{', '.join(repr(t) for t in _FAMILY_OF_TYPE)})")
    family = _FAMILY_OF_TYPE[model_type]
    arch = FAMILIES[family].hf_architecture
    archs = hf.get("architectures") or [arch]
    if not isinstance(archs, list) or archs != [arch]:
        raise HFError(f"config.json: architectures {archs} not supported; expected [{arch!r}]")
    if hf.get("quantization_config") is not None:
        raise refuse("quantization_config", hf["quantization_config"],
                     "no quantization_config: quantized checkpoints are not supported; use float weights")
    return family


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Validate a config.json dict and translate it (param_dtype float32: the caller sets the stored dtype)."""
    family = _family(hf)
    common = {"family": family, "vocab_size": number(hf, "vocab_size"),
              "init_std": number(hf, "initializer_range", float, 0.02), "param_dtype": "float32", "dtype": "float32"}
    if family == "gpt2":
        return _gpt2_from_hf(hf, common)
    _check_options(hf, family)
    defaults = _DEFAULTS[family]
    d, heads = number(hf, "hidden_size"), number(hf, "num_attention_heads")
    kv = number(hf, "num_key_value_heads", int, defaults["num_key_value_heads"] or heads)
    head_dim = number(hf, "head_dim", int, defaults["head_dim"] or d // heads or None)
    if heads % kv or head_dim % 2:
        raise HFError(f"config.json: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv} "
                      f"and head_dim={head_dim} even")
    n_layers, max_len = number(hf, "num_hidden_layers"), number(hf, "max_position_embeddings", int,
                                                                 defaults["max_position_embeddings"])
    theta, scaling = rope_from_hf(hf, max_len)
    window, every = _windows(hf, family, n_layers)
    extra: dict[str, Any] = {}
    if family == "gemma2":
        extra = {"attn_softcap": optional_number(hf, "attn_logit_softcapping", float, 50.0),
                 "final_softcap": optional_number(hf, "final_logit_softcapping", float, 30.0),
                 "query_pre_attn_scalar": number(hf, "query_pre_attn_scalar", float, 256.0)}
    return ModelConfig(
        d_model=d, n_layers=n_layers, n_heads=heads, n_kv_heads=None if kv == heads else kv,
        head_dim=None if head_dim * heads == d else head_dim, d_ff=number(hf, "intermediate_size"), max_seq_len=max_len,
        rope_theta=theta, rope_scaling=scaling, norm_eps=number(hf, "rms_norm_eps", float, 1e-6),
        tie_embeddings=flag(hf, "tie_word_embeddings", family == "gemma2"), sliding_window=window,
        global_layer_every=every, **extra, **common)


def _check_options(hf: Mapping[str, Any], family: str) -> None:
    """Refuse the options of RoPE families that lmadapt does not implement."""
    if family == "gemma2":
        require(hf, "hidden_activation", hf.get("hidden_activation", "gelu_pytorch_tanh") in _TANH_GELU,
                " or ".join(map(repr, _TANH_GELU)))
        require(hf, "use_bidirectional_attention", not flag(hf, "use_bidirectional_attention"), "false or null")
    else:
        require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "'silu'")
    if family in ("llama", "qwen3", "gemma2"):  # qwen2's q/k/v biases are fixed by the family, mistral has none
        require(hf, "attention_bias", not flag(hf, "attention_bias"), "false")
    if family == "llama":
        require(hf, "mlp_bias", not flag(hf, "mlp_bias"), "false")
        require(hf, "sliding_window", hf.get("sliding_window") is None,
                "null: LlamaForCausalLM has no sliding window (model_type 'mistral' does)")
    if family in ("qwen2", "qwen3"):
        require(hf, "use_sliding_window", not flag(hf, "use_sliding_window"),
                "false: Qwen's sliding window on the top layers is not implemented")


def _windows(hf: Mapping[str, Any], family: str, n_layers: int) -> tuple[int | None, int]:
    """(sliding_window, global_layer_every) of a config.json, its `layer_types` checked against them."""
    window = optional_number(hf, "sliding_window", int, _DEFAULTS[family].get("sliding_window"))
    if family not in ("mistral", "gemma2"):
        window = None  # llama refused a window above; Qwen's is off (use_sliding_window false)
    every = 2 if family == "gemma2" else 0
    types = hf.get("layer_types")
    if types is None:
        return window, every
    if not (isinstance(types, list) and len(types) == n_layers and all(t in (FULL, SLIDING) for t in types)):
        raise refuse("layer_types", types, f"a list of {n_layers} 'full_attention'/'sliding_attention'")
    if family == "gemma2":
        every = _pattern(types)
        if every is None:
            raise refuse("layer_types", types, "local layers with every Nth layer global (Gemma 2: alternating)")
        return window, every
    expected = [SLIDING if window is not None else FULL] * n_layers
    if types != expected:
        raise refuse("layer_types", types, f"{expected[0]!r} on every layer, as {family} computes attention")
    return window, every


def _pattern(types: list[str]) -> int | None:
    """N such that layer i is global iff i % N == N - 1 (0: every layer local), or None."""
    for n in range(len(types) + 1):
        if types == [FULL if n and i % n == n - 1 else SLIDING for i in range(len(types))]:
            return n
    return None


def _gpt2_from_hf(hf: Mapping[str, Any], common: dict[str, Any]) -> ModelConfig:
    require(hf, "activation_function", hf.get("activation_function", "gelu_new") in _TANH_GELU,
            " or ".join(_TANH_GELU))
    require(hf, "scale_attn_weights", flag(hf, "scale_attn_weights", True), "true")
    require(hf, "scale_attn_by_inverse_layer_idx", not flag(hf, "scale_attn_by_inverse_layer_idx"), "false")
    require(hf, "add_cross_attention", not flag(hf, "add_cross_attention"), "false")
    require(hf, "tie_word_embeddings", flag(hf, "tie_word_embeddings", True), "true")
    d, heads = number(hf, "n_embd"), number(hf, "n_head")
    if d % heads:
        raise HFError(f"config.json: n_embd={d} is not a multiple of n_head={heads}")
    return ModelConfig(d_model=d, n_layers=number(hf, "n_layer"), n_heads=heads, d_ff=number(hf, "n_inner", int, 4 * d),
                       max_seq_len=number(hf, "n_positions"), norm_eps=number(hf, "layer_norm_epsilon", float, 1e-5),
                       tie_embeddings=True, **common)


# ---- Export ------------------------------------------------------------------------------------------------------


def _check_exportable(cfg: ModelConfig) -> None:
    """Refuse a ModelConfig whose options the family's transformers class cannot express."""
    fam = cfg.family
    checks = [("attn_softcap", cfg.attn_softcap is None or fam == "gemma2"),
              ("final_softcap", cfg.final_softcap is None or fam == "gemma2"),
              ("query_pre_attn_scalar", cfg.query_pre_attn_scalar is None or fam == "gemma2"),
              ("sliding_window", cfg.sliding_window is None or fam in ("mistral", "gemma2")),
              ("global_layer_every", cfg.global_layer_every == 0 or fam == "gemma2" or cfg.sliding_window is None),
              ("rope_scaling", cfg.rope_scaling.type == "default" or fam != "gpt2")]
    for key, ok in checks:
        if not ok:
            raise HFError(f"model.{key}={getattr(cfg, key)!r} cannot be exported as a {fam} checkpoint: "
                          f"transformers' {FAMILIES[fam].hf_architecture} has no such option")
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    if fam == "gpt2" and (hd * h != d or kv != h or not cfg.tie_embeddings):
        raise HFError(f"GPT-2 needs head_dim * n_heads == d_model, no grouped-query heads and tied embeddings; "
                      f"got d_model={d}, n_heads={h}, n_kv_heads={kv}, head_dim={hd}, "
                      f"tie_embeddings={cfg.tie_embeddings}")


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)  # transformers types some of these as int (strict)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32", *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """The config.json dict of `cfg` for its family's transformers class; special ids (negative or None: absent)
    go in. `dtype` is the stored dtype of the weights written beside it."""
    if dtype not in DTYPES:
        raise HFError(f"export dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    _check_exportable(cfg)
    fam = cfg.family
    if fam == "gpt2":
        config: dict[str, Any] = {
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_seq_len,
            "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    else:
        config = {
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, **rope_to_hf(cfg)}
        config.update(_family_keys(cfg))
    config.update({"model_type": FAMILIES[fam].hf_model_type, "architectures": [FAMILIES[fam].hf_architecture],
                   "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                   "initializer_range": cfg.init_std,
                   "dtype": dtype, "torch_dtype": dtype})  # "torch_dtype": the name before transformers 5
    for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
        # An absent id is written as null: left out, transformers would fill in its class default (Llama's bos 1,
        # Gemma 2's bos 2, GPT-2's 50256), a token the tokenizer does not have there.
        config[key] = int(value) if value is not None and value >= 0 else None
    return config


def _family_keys(cfg: ModelConfig) -> dict[str, Any]:
    """The keys that differ between the RoPE families."""
    fam = cfg.family
    if fam == "gemma2":
        return {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
                "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),
                "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
                "sliding_window": cfg.sliding_window,
                "layer_types": [FULL if cfg.global_layer_every and i % cfg.global_layer_every ==
                                cfg.global_layer_every - 1 else SLIDING for i in range(cfg.n_layers)]}
    keys: dict[str, Any] = {"hidden_act": "silu"}
    if fam == "llama":
        keys.update(attention_bias=False, mlp_bias=False)
    elif fam == "mistral":
        keys["sliding_window"] = cfg.sliding_window
    else:  # qwen2, qwen3
        keys.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if fam == "qwen3":
            keys["attention_bias"] = False
    return keys


def generation_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """generation_config.json for an exported config.json: its special ids (None when it has none)."""
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {"_from_model_config": True, **ids} if ids else None
