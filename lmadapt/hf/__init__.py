"""Hugging Face interchange: lmadapt params <-> the weights and config.json of transformers' causal LMs
(`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `Gemma2ForCausalLM`,
`GPT2LMHeadModel`).

    ckpt = open_hf("path/to/Qwen2.5-0.5B")    # validated; weights are read only by load
    params = ckpt.load(target)               # streamed onto target's shardings, each process its own slices
    export_hf("out/hf", params, cfg, tokenizer, dtype="bfloat16")   # streamed, sharded above max_shard_bytes
    params, cfg, tokenizer = import_hf("out/hf")                     # host numpy, stored dtype
    state, hf_config = to_hf(params, cfg); params, cfg = from_hf(state, hf_config)   # in memory

`lmadapt.model` is parameterised as transformers is, so conversion is renaming, reshaping and transposing alone
(`rules.py`: one rule per tensor). Only safetensors is read or written (never pickle), and neither torch nor
transformers is needed here.

Modules: `configs` (config.json <-> ModelConfig), `rope_config` (RoPE keys), `rules` (tensor rules),
`safetensors_io` (streaming reader/writer, shard index), `checkpoint` (open/load/import), `export`, `dumps`.
"""

from lmadapt.hf.checkpoint import BUFFERS, HFCheckpoint, from_hf, import_hf, open_hf, read_hf_state
from lmadapt.hf.common import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, WEIGHTS_FILE, HFError
from lmadapt.hf.configs import config_from_hf, config_to_hf
from lmadapt.hf.dumps import load_safetensors_dump, save_safetensors_dump
from lmadapt.hf.export import export_hf, to_hf
from lmadapt.hf.rules import Rule, rules_for

__all__ = [
    "BUFFERS",
    "CONFIG_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "HFCheckpoint",
    "HFError",
    "Rule",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "from_hf",
    "import_hf",
    "load_safetensors_dump",
    "open_hf",
    "read_hf_state",
    "rules_for",
    "save_safetensors_dump",
    "to_hf",
]
