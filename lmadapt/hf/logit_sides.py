"""The two sides a logit check compares: a model run by lmadapt and the same checkpoint run by transformers.

Both offer one interface (`Side`): encode texts, logits of one row, greedy decode with the KV cache, decode ids.
`lmadapt.hf.logit_check` compares a candidate side against a reference side; which is which is its business.

    cand = lmadapt_from_hf("out/hf", dtype="float32")                       # DIR's own weights, via lmadapt.hf
    cand = lmadapt_from_lineage("lineage", "v3", dtype="float32")           # a lineage version's params
    ref = transformers_side("out/hf", dtype="float32")                      # None when torch/transformers are absent

Memory: lmadapt keeps the params in their stored dtype (computing in `dtype`), reading the safetensors straight onto
the device leaf by leaf; transformers loads the weights in `dtype`. Rows are run one at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.model import Transformer, per_layer

DTYPES = ("float32", "bfloat16")


class Side(Protocol):
    """One way of running the checkpoint."""

    name: str  # for the report, e.g. "lmadapt (lineage L version v3)"
    vocab_size: int
    has_tokenizer: bool

    def encode(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens int [T] -> float32 logits [T, vocab] (a full forward pass, no cache)."""
        ...

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy decode with the KV cache, never stopping early: int [new_tokens]."""
        ...


@dataclasses.dataclass
class LmadaptSide:
    """The checkpoint as lmadapt runs it."""

    name: str
    params: Any
    cfg: ModelConfig  # its compute dtype is the check's dtype
    tokenizer: Tokenizer | None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        assert self.tokenizer is not None
        return self.tokenizer.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([list(map(int, ids))])[0] if self.tokenizer is not None else str(list(ids))

    def bos_id(self) -> int | None:
        """The id lmadapt starts documents with (None: it prepends none)."""
        return self.tokenizer.bos_id if self.tokenizer is not None and self.tokenizer.bos_id >= 0 else None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        out = _logits(self.params, jnp.asarray(tokens, jnp.int32)[None], model=Transformer(self.cfg))
        return np.asarray(out[0], np.float32)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        from lmadapt.generate import generate

        out = generate(Transformer(self.cfg), self.params, jnp.asarray(prompt, jnp.int32)[None], new_tokens,
                       rng=jax.random.key(0))
        return np.asarray(out[0, len(prompt):])


# The model is a static argument: equal configs give equal modules, one compile. Not `lmadapt.model.forward`: a row
# here is one unpacked document from position 0, which the model's defaults (positions 0..T-1, one segment) state
# without building a batch, and the check's graph stays the one it has always compared.
@functools.partial(jax.jit, static_argnames="model")
def _logits(params: Any, tokens: jax.Array, *, model: Transformer) -> jax.Array:
    return model.apply({"params": params}, tokens)


def _compute(cfg: ModelConfig, dtype: str) -> ModelConfig:
    # The per-layer layout (what import and `load_params(scan_layers=False)` give) and the check's compute dtype.
    # cuDNN's fused attention has no float32 kernel: a version trained with it is checked in float32 on XLA's.
    attention = "xla" if cfg.attention == "cudnn" and dtype == "float32" else cfg.attention
    return dataclasses.replace(per_layer(cfg), dtype=dtype, remat="none", attention=attention)


def lmadapt_from_hf(directory: str, dtype: str = "float32") -> LmadaptSide:
    """DIR's own weights, config and tokenizer as lmadapt imports them (lmadapt.hf.open_hf: HFError on bad input).
    The weights go onto the device leaf by leaf in their stored dtype, never all on the host at once."""
    from lmadapt.hf import open_hf

    ckpt = open_hf(directory)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = jnp.dtype(ckpt.config.param_dtype)
    target: dict[str, Any] = {}
    for rule in ckpt.rules:
        node = target
        for key in rule.leaf[:-1]:
            node = node.setdefault(key, {})
        node[rule.leaf[-1]] = jax.ShapeDtypeStruct(rule.lm_shape, stored, sharding=device)
    params = ckpt.load(target)
    return LmadaptSide(f"lmadapt ({directory})", params, _compute(ckpt.config, dtype), ckpt.tokenizer)


def lmadapt_from_lineage(lineage_dir: str, version: str, dtype: str = "float32") -> LmadaptSide:
    """A lineage version's params, model config and tokenizer (LineageError on bad input)."""
    from lmadapt.lineage.store import Lineage, LineageError

    if not os.path.isdir(lineage_dir):
        raise LineageError(f"lineage directory {lineage_dir!r} not found")
    lineage = Lineage(lineage_dir)
    cfg = lineage.model_config(version)
    params = lineage.load_params(version, scan_layers=False)
    return LmadaptSide(f"lmadapt (lineage {lineage_dir}, version {version})", params, _compute(cfg, dtype),
                       lineage.tokenizer(version))


class TransformersSide:
    """The checkpoint as `transformers.AutoModelForCausalLM` runs it (eager attention: the reference
    implementation, and what Gemma 2's soft-capping needs), with `AutoTokenizer`'s encoding."""

    def __init__(self, directory: str, dtype: str = "float32"):
        import torch
        import transformers

        self.name = f"transformers {transformers.__version__} ({directory})"
        self._torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        try:
            self.tokenizer: Any = transformers.AutoTokenizer.from_pretrained(directory)
        except Exception as e:  # transformers raises many kinds here (OSError, ValueError, KeyError ...)
            self.tokenizer, self.tokenizer_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        # A clean generation config: greedy, and no eos stop or repetition penalty a checkpoint's own
        # generation_config.json may set (transformers fills unset fields of a passed config from it).
        pad = self.model.generation_config.pad_token_id
        self.model.generation_config = transformers.GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=0 if pad is None or isinstance(pad, list) else pad)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        # verbose=False: no "longer than model_max_length" warning; rows are cut to the model's length later.
        return [list(self.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens skipped, as lmadapt's decode does.
        return (self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True) if self.tokenizer is not None
                else str(list(ids)))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(np.asarray(tokens, np.int64))[None]).logits
        return out[0].float().numpy()

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(np.asarray(prompt, np.int64))[None]
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      use_cache=True)
        return out[0, len(prompt):].numpy()


def transformers_available() -> bool:
    """Whether torch and transformers can be imported (the reference implementation)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
