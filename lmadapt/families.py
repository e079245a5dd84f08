"""Model families as data: what each block of one `Transformer` does for `model.family`.

A family fixes the layout its checkpoints share (norm kind, MLP kind, which projections carry biases, q/k norms,
sandwich norms, how positions enter); what varies between checkpoints of one family (sizes, RoPE scaling, the
sliding window, softcaps) is a field of `ModelConfig`. Each option is parameterised exactly as transformers'
class for that family, so converting weights is renaming and reshaping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Family:
    """The fixed layout of a family's blocks."""

    hf_model_type: str  # config.json "model_type"
    hf_architecture: str  # config.json "architectures"[0]
    norm: Literal["rms", "rms_offset", "layer"]  # rms_offset: Gemma's x * (1 + w), all in float32
    mlp: Literal["swiglu", "geglu", "gelu"]  # gated silu / gated tanh-gelu / plain tanh-gelu
    qkv_bias: bool = False  # biases on q, k, v (Qwen2, GPT-2)
    out_bias: bool = False  # biases on attention o and the MLP (GPT-2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    post_norms: bool = False  # a norm after attention and after the MLP too, before the residual add (Gemma 2)
    rope: bool = True  # False: learned absolute positions (GPT-2)
    embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
    scaled_residual_init: bool = False  # init std / sqrt(2 n_layers) for o and down (GPT-2)
    sliding_window: bool = False  # checkpoints of this family may use sliding-window attention
    softcaps: bool = False  # attention and final logit soft-capping (Gemma 2)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "rms", "swiglu"),
    "mistral": Family("mistral", "MistralForCausalLM", "rms", "swiglu", sliding_window=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "rms", "swiglu", qkv_bias=True),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "rms", "swiglu", qk_norm=True),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", "rms_offset", "geglu", post_norms=True, embed_scale=True,
                     sliding_window=True, softcaps=True),
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "layer", "gelu", qkv_bias=True, out_bias=True, rope=False,
                   scaled_residual_init=True),
}


def family(name: str) -> Family:
    """The layout of family `name` (validated config names only)."""
    return FAMILIES[name]
