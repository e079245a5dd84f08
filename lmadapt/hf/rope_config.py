"""RoPE settings in config.json (`rope_theta`, `rope_scaling`, `rope_parameters`) <-> (rope_theta, RopeScalingConfig).

transformers >= 5 reads `rope_parameters` (with `rope_theta` inside) but lets a non-null `rope_scaling` win;
older versions read `rope_scaling` and a top-level `rope_theta`. Import reads both as transformers does, export
writes both, so either generation of transformers loads the same frequencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmadapt.config import ModelConfig, RopeScalingConfig
from lmadapt.hf.values import number, refuse

DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                "partial_rotary_factor"}
_TYPE_KEYS = {"default": set(), "linear": set(), "dynamic": set(), "llama3": {"low_freq_factor", "high_freq_factor"},
              "yarn": {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}}


def _rope_dict(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the key it came from, the RoPE dict transformers uses); {} when there is none.

    A non-null `rope_scaling` is what every transformers version reads (5 lets it win over `rope_parameters`),
    so it wins here too; without one, `rope_parameters` as transformers 5 reads it.
    """
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, Mapping):
            raise refuse(key, value, "an object or null")
    if scaling:
        return "rope_scaling", dict(scaling)
    return "rope_parameters", dict(params or {})


def rope_from_hf(hf: Mapping[str, Any], max_len: int) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, RopeScalingConfig) of a config.json; unknown types and keys are refused by name."""
    where, rope = _rope_dict(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _TYPES:
        raise refuse(f"{where}.rope_type", rope_type, " or ".join(map(repr, _TYPES)))
    unknown = sorted(set(rope) - _COMMON_KEYS - _TYPE_KEYS[rope_type])
    if unknown:
        raise refuse(f"{where}.{unknown[0]}", rope[unknown[0]], f"no such key for rope_type {rope_type!r}")
    for source, key in ((rope, f"{where}.partial_rotary_factor"), (hf, "partial_rotary_factor")):
        value = source.get("partial_rotary_factor")
        if value is not None and value != 1:
            raise refuse(key, value, "1.0: partial rotary embeddings are not implemented")
    theta = number(rope, "rope_theta", float, None, prefix=f"{where}.") or number(hf, "rope_theta", float,
                                                                                DEFAULT_THETA)
    if rope_type == "default":
        return theta, RopeScalingConfig()
    # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style checkpoints).
    original = number(hf, "original_max_position_embeddings", int, None) or number(
        rope, "original_max_position_embeddings", int, max_len, prefix=f"{where}.")
    kw: dict[str, Any] = {"type": rope_type}
    if rope_type == "yarn" and rope.get("factor") is None:
        kw["factor"] = max_len / original  # transformers' fallback for DeepSeek-style configs
    else:
        kw["factor"] = number(rope, "factor", float, prefix=f"{where}.")
    if rope_type in ("llama3", "yarn"):
        kw["original_max_len"] = original
    if rope_type == "llama3":
        kw["low_freq_factor"] = number(rope, "low_freq_factor", float, prefix=f"{where}.")
        kw["high_freq_factor"] = number(rope, "high_freq_factor", float, prefix=f"{where}.")
        if kw["high_freq_factor"] <= kw["low_freq_factor"]:
            raise refuse(f"{where}.high_freq_factor", kw["high_freq_factor"],
                         f"more than low_freq_factor={kw['low_freq_factor']}")
    if rope_type == "yarn":
        # transformers reads `rope.get(beta) or default`: a null or 0 takes the default too.
        kw["beta_fast"] = float(rope.get("beta_fast") or 32.0)
        kw["beta_slow"] = float(rope.get("beta_slow") or 1.0)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            kw[key] = number(rope, key, float, None, prefix=f"{where}.")
        truncate = rope.get("truncate", True)
        if not isinstance(truncate, bool):
            raise refuse(f"{where}.truncate", truncate, "true or false")
        kw["truncate"] = truncate
    return theta, RopeScalingConfig(**kw)


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json RoPE keys for `cfg`: rope_theta, rope_parameters and rope_scaling (null when unscaled)."""
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": s.type}
    if s.type != "default":
        out["factor"] = s.factor
    if s.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = s.original_max_len or cfg.max_seq_len
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        out.update({k: getattr(s, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                    if getattr(s, k) is not None})
    return {"rope_theta": cfg.rope_theta, "rope_parameters": {**out, "rope_theta": cfg.rope_theta},
            "rope_scaling": out if s.type != "default" else None}
