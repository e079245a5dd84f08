"""Writing lmadapt params as a Hugging Face directory, one tensor at a time.

Each HF tensor is gathered (from device shards, across processes if need be), converted and streamed into its
safetensors file before the next is touched, so the host holds at most one tensor beyond the params themselves.
Process 0 writes; the others only take part in the gathers. Everything goes into a temporary sibling directory
renamed into place at the end, so a crash leaves no half-written checkpoint, and an existing non-empty target
is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from lmadapt.config import ModelConfig
from lmadapt.data.tokenizers import HFTokenizer, Tokenizer, TokenizerError, save_hf_tokenizer
from lmadapt.hf.common import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    HFError,
    check_empty_target,
    make_parents,
    make_staging_dir,
    remove_made,
    write_json,
)
from lmadapt.hf.configs import config_to_hf, generation_config
from lmadapt.hf.rules import assemble, hf_tensors, rules_for, stacked_path
from lmadapt.hf.safetensors_io import StreamingWriter, dtype_code, index_json, plan_shards, shard_names


def _host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array on this host, whole."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    # np.asarray(x) would keep the host copy cached on x (the live param) for as long as it lives: a second
    # copy of the model by the end of the export. A fresh array over the same device buffers takes the cache.
    alias = jax.make_array_from_single_device_arrays(x.shape, x.sharding, [s.data for s in x.addressable_shards])
    return np.asarray(alias)


def leaf_getter(params: Any, cfg: ModelConfig) -> Callable[[tuple[str, ...]], np.ndarray]:
    """Per-layer leaf path -> that leaf on the host, from params in either layout (boxed or plain). A stacked
    (scan) leaf is sliced on its devices first, so only that layer is gathered."""
    params = nn.meta.unbox(params)
    shapes = {r.leaf: r.lm_shape for r in rules_for(cfg)}

    def get(path: tuple[str, ...]) -> np.ndarray:
        stacked, layer = stacked_path(path)
        use_stack = layer is not None and "layers" in params
        node = params
        try:
            for key in stacked if use_stack else path:
                node = node[key]
        except (KeyError, TypeError):
            raise HFError(f"params have no leaf {'/'.join(path)} (expected for a {cfg.family} model)") from None
        value = _host(node[layer] if use_stack else node)
        if tuple(value.shape) != shapes[path]:
            raise HFError(f"param {'/'.join(path)}: shape {tuple(value.shape)}, expected {shapes[path]} from the "
                          f"model config")
        return value

    return get


def to_hf(params: Any, cfg: ModelConfig, dtype: str = "float32", *, bos_id: int | None = None,
          eos_id: int | None = None, pad_id: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """In memory: lmadapt params (plain or boxed; per-layer or scan-stacked) -> (HF state dict, config.json dict).

    `dtype` ("float32" or "bfloat16") is the dtype of every tensor and of the config's `dtype`; special ids
    (negative or None: absent) go into the config.
    """
    config = config_to_hf(cfg, dtype, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    get, out = leaf_getter(params, cfg), DTYPES[dtype]
    state = {name: np.ascontiguousarray(assemble(parts, [get(r.leaf) for r in parts]), dtype=out)
             for name, _, parts in hf_tensors(rules_for(cfg))}
    return state, config


def write_weights(directory: str, params: Any, cfg: ModelConfig, dtype: str = "float32", *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, write: bool = True) -> list[str]:
    """Stream the HF tensors of `params` into `directory` (model.safetensors, or shards and their index above
    `max_shard_bytes`); return the files written. Every process calls it; only those with `write` write."""
    if max_shard_bytes <= 0:
        raise HFError(f"max_shard_bytes={max_shard_bytes}: expected a positive number of bytes")
    tensors = list(hf_tensors(rules_for(cfg)))
    code = dtype_code(DTYPES[dtype])
    specs = [(name, code, shape) for name, shape, _ in tensors]
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    get = leaf_getter(params, cfg)
    for file, idx in zip(names, shards, strict=True):
        path = os.path.join(directory, file)
        writer = StreamingWriter(path, [specs[i] for i in idx]) if write else None
        if writer is None:
            for i in idx:  # take part in the gathers only
                [get(r.leaf) for r in tensors[i][2]]
            continue
        with writer:
            for i in idx:
                name, _, parts = tensors[i]
                writer.write(name, assemble(parts, [get(r.leaf) for r in parts]))
    if len(shards) > 1 and write:
        write_json(os.path.join(directory, INDEX_FILE), index_json(specs, shards))
        names = [*names, INDEX_FILE]
    return names


def export_hf(directory: str, params: Any, cfg: ModelConfig, tokenizer: Tokenizer | None = None,
              dtype: str = "float32", bos_id: int | None = None, eos_id: int | None = None, *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads; return its path.

    Writes the weights (model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    above `max_shard_bytes`) in `dtype` ("float32" or "bfloat16"), config.json, generation_config.json (when
    special ids are known; they default to the tokenizer's) and the tokenizer's files. Every process of a
    multi-process job must call it (the weights are gathered collectively); process 0 writes.
    """
    directory = check_empty_target(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.vocab_size}; "
                      f"they do not belong together")
    if tokenizer is not None:
        bos_id = tokenizer.bos_id if bos_id is None else bos_id
        eos_id = tokenizer.eos_id if eos_id is None else eos_id
    pad_id = tokenizer.pad_id if tokenizer is not None else None
    config = config_to_hf(cfg, dtype, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    lead = jax.process_index() == 0
    tmp, made = None, []
    if lead:
        made = make_parents(directory)  # a missing --out folder is created, as save_pretrained does
        tmp = make_staging_dir(directory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the published checkpoint private
    try:
        write_weights(tmp or "", params, cfg, dtype, max_shard_bytes=max_shard_bytes, write=lead)
        if tmp is not None:
            write_json(os.path.join(tmp, CONFIG_FILE), config)
            gen = generation_config(config)
            if gen:
                write_json(os.path.join(tmp, GENERATION_CONFIG_FILE), gen)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp, cfg, shown=directory)
            os.replace(tmp, directory)  # rename(2) replaces an empty directory atomically
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            remove_made(made)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lmadapt-export-hf")
    return directory


def save_tokenizer(tokenizer: Tokenizer, directory: str, cfg: ModelConfig, *, shown: str | None = None) -> None:
    """The tokenizer's files as transformers reads them (tokenizer.json + tokenizer_config.json, and the
    tokenizer's own file so lmadapt gets back exactly the tokenizer it trained with)."""
    try:
        save_hf_tokenizer(tokenizer, directory, cfg.max_seq_len)
    except TokenizerError as e:
        raise HFError(f"tokenizer: {e}") from None
    if cfg.family == "qwen2" and not _has_qwen2_pipeline(tokenizer):
        # transformers 5 loads every model_type "qwen2" directory's tokenizer as Qwen2Tokenizer, which swaps the
        # tokenizer.json's normalizer and pre-tokenizer for Qwen's own: right for Qwen's tokenizer, wrong for one
        # lmadapt trained (tools/check_hf.py shows the difference).
        warnings.warn(f"{shown or directory}: AutoTokenizer will load this qwen2 model's tokenizer as "
                      "Qwen2Tokenizer and encode differently from training; load it with "
                      "PreTrainedTokenizerFast.from_pretrained(dir), or train with a Qwen tokenizer", stacklevel=2)


# What transformers' Qwen2Tokenizer puts in front of the byte-level BPE, whatever tokenizer.json says.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def _has_qwen2_pipeline(tokenizer: Tokenizer) -> bool:
    """Whether Qwen2Tokenizer's normalizer (NFC) and split are already this tokenizer's (a Qwen tokenizer)."""
    if not isinstance(tokenizer, HFTokenizer):
        return False
    spec = json.loads(tokenizer.tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    return ((spec.get("normalizer") or {}).get("type") == "NFC" and len(splits) == 1
            and splits[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT)
