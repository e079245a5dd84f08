"""Generation samples of a version: a greedy continuation of a prompt (`eval.py --prompt`), to see at a glance
what a version writes."""

from __future__ import annotations

import jax
import numpy as np

from lmadapt.generate import generate
from lmadapt.lineage.store import Lineage
from lmadapt.model import Transformer, per_layer


def sample(lineage: Lineage, version: str, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by `version` of `lineage` (KV-cached decoding), at most `max_new_tokens`
    tokens, ending at the tokenizer's end of text. The prompt (after a BOS token, if the tokenizer has one) is cut
    from the left so that prompt and continuation fit the model's `max_seq_len`."""
    tokenizer = lineage.tokenizer(version)
    # Model and params both in the per-layer layout, whichever layout the version was trained in.
    model = Transformer(per_layer(lineage.model_config(version)))
    params = lineage.load_params(version, scan_layers=False)
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    ids = head + tokenizer.encode([prompt])[0]
    ids = ids[-(model.config.max_seq_len - max_new_tokens):]
    out = generate(model, params, np.asarray([ids], np.int32), max_new_tokens, rng=jax.random.PRNGKey(0),
                   eos_id=tokenizer.eos_id)
    new = [int(t) for t in np.asarray(out)[0, len(ids):] if t != tokenizer.eos_id]
    return tokenizer.decode([new])[0]
