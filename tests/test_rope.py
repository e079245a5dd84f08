"""RoPE scalings: lmadapt's frequencies and attention factors equal transformers' for every rope_type it imports."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from lmadapt.config import ModelConfig, RopeScalingConfig  # noqa: E402
from lmadapt.rope import _dynamic_inv_freq, apply_rope, static_frequencies  # noqa: E402

# (transformers' rope_parameters, the same in lmadapt's RopeScalingConfig); head_dim 32, max length 64.
CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, RopeScalingConfig(type="linear", factor=4.0)),
    "llama3": ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16},
               RopeScalingConfig(type="llama3", factor=32.0, original_max_len=16)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
             RopeScalingConfig(type="yarn", factor=4.0, original_max_len=16)),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
                     "beta_slow": 2.0, "mscale": 0.707, "mscale_all_dim": 0.707, "truncate": False},
                    RopeScalingConfig(type="yarn", factor=8.0, original_max_len=16, beta_fast=16.0, beta_slow=2.0,
                                      mscale=0.707, mscale_all_dim=0.707, truncate=False)),
}


def _configs(params: dict, scaling: RopeScalingConfig) -> tuple[LlamaConfig, ModelConfig]:
    hf = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=64,
                     rope_parameters={"rope_theta": 50000.0, **params})
    ours = ModelConfig(d_model=128, n_heads=4, head_dim=32, max_seq_len=64, rope_theta=50000.0, rope_scaling=scaling)
    return hf, ours


@pytest.mark.parametrize("name", CASES)
def test_static_frequencies_match_transformers(name):
    hf, ours = _configs(*CASES[name])
    inv_freq, factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
    mine, my_factor = static_frequencies(ours)
    np.testing.assert_allclose(mine, inv_freq.numpy(), rtol=1e-6)
    assert my_factor == pytest.approx(factor, rel=1e-7)


@pytest.mark.parametrize("longest", [10, 64, 200])  # within, at, and past max_seq_len (the base grows past it)
def test_dynamic_frequencies_match_transformers(longest):
    hf, ours = _configs({"rope_type": "dynamic", "factor": 2.0}, RopeScalingConfig(type="dynamic", factor=2.0))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=longest)
    mine = _dynamic_inv_freq(ours, jnp.arange(longest)[None])
    np.testing.assert_allclose(np.asarray(mine), inv_freq.numpy(), rtol=1e-5)


def test_rotation_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf, ours = _configs(*CASES["yarn"])
    x = np.random.default_rng(0).standard_normal((2, 40, 4, 32)).astype(np.float32)  # [B, T, heads, D]
    positions = np.stack([np.arange(40), np.arange(40) + 3])
    cos, sin = LlamaRotaryEmbedding(hf)(torch.tensor(x), torch.tensor(positions))
    ref, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
    mine = apply_rope(jnp.asarray(x), jnp.asarray(positions), ours)
    np.testing.assert_allclose(np.asarray(mine), ref.transpose(1, 2).numpy(), atol=1e-5)
