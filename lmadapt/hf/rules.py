"""Per-tensor conversion rules: which Hugging Face tensor (or part of one) each lmadapt param leaf is.

A rule relates one leaf L (per-layer layout, e.g. `layers_0/attn/q/kernel` [d, H, hd]) to one HF tensor T:

    view = T[part]                 # the leaf's columns of a fused tensor (GPT-2's c_attn), else all of T
    view = view.T if transpose     # torch Linear weights are [out, in]; lmadapt kernels are [in, out]
    L    = view.reshape(L.shape)   # consecutive leaf axes merge into one view axis (`groups`)

Both directions are exact (moves of values only), and `read` maps any rectangular index of L to one rectangular
slice of T, so a process reads from disk only the part of each tensor its devices hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.families import family as family_of

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One lmadapt leaf <-> one HF tensor (or the `part` of a fused one)."""

    leaf: tuple[str, ...]  # path in the per-layer layout
    name: str  # HF tensor name
    lm_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]  # the whole HF tensor
    groups: tuple[int, ...]  # how many consecutive leaf axes make each axis of the (untransposed) view
    transpose: bool = False
    part: tuple[int, int, int] | None = None  # (HF axis, start, stop) of a fused tensor

    @property
    def view_shape(self) -> tuple[int, ...]:
        out, axis = [], 0
        for g in self.groups:
            out.append(math.prod(self.lm_shape[axis:axis + g]))
            axis += g
        return tuple(out)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """The HF values of this leaf (the rule's part of a fused tensor), a view where numpy allows."""
        view = np.asarray(value).reshape(self.view_shape)
        return view.T if self.transpose else view

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """The leaf from the whole HF tensor."""
        return self.read(lambda index: tensor[index], ())

    def read(self, get: Callable[[Index], np.ndarray], index: Index) -> np.ndarray:
        """L[index] (slices of step 1, as device shards are), from `get(hf_index)` of one rectangular HF slice.

        A leaf axis merged with faster ones into one view axis is read in whole rows of those faster axes and
        sliced after (a shard of head_dim alone reads the heads it touches); other slices read exactly.
        """
        bounds = [s.indices(n)[:2] for s, n in zip(_full(index, len(self.lm_shape)), self.lm_shape, strict=True)]
        view_index, block_shape, inner = [], [], []
        axis = 0
        for g in self.groups:
            (start, stop), rest = bounds[axis], self.lm_shape[axis + 1:axis + g]
            size = math.prod(rest)
            view_index.append(slice(start * size, stop * size))
            block_shape += [stop - start, *rest]
            inner += [slice(None)] + [slice(*b) for b in bounds[axis + 1:axis + g]]
            axis += g
        hf_index = view_index[::-1] if self.transpose else view_index
        if self.part is not None:
            ax, offset, _ = self.part
            hf_index[ax] = slice(hf_index[ax].start + offset, hf_index[ax].stop + offset)
        block = np.asarray(get(tuple(hf_index)))
        block = block.T if self.transpose else block
        return block.reshape(block_shape)[tuple(inner)]


def _full(index: Index, ndim: int) -> Index:
    index = tuple(index)
    return index + (slice(None),) * (ndim - len(index))


def rules_for(cfg: ModelConfig) -> list[Rule]:
    """Every leaf's rule, in the order HF checkpoints list their tensors (embeddings, layers, final norm, head)."""
    if cfg.family == "gpt2":
        return _gpt2_rules(cfg)
    fam = family_of(cfg.family)
    d, h, kv, hd, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
    rules = [Rule(("embed", "embedding"), "model.embed_tokens.weight", (v, d), (v, d), (1, 1))]
    for i in range(cfg.n_layers):
        lay, pre = f"layers_{i}", f"model.layers.{i}."
        vec = lambda leaf, name, n, lay=lay, pre=pre: Rule((lay, *leaf), pre + name, (n,), (n,), (1,))
        rules.append(vec(("attn_norm", "scale"), "input_layernorm.weight", d))
        for proj, heads in (("q", h), ("k", kv), ("v", kv)):
            rules.append(Rule((lay, "attn", proj, "kernel"), f"{pre}self_attn.{proj}_proj.weight", (d, heads, hd),
                              (heads * hd, d), (1, 2), transpose=True))
            if fam.qkv_bias:
                rules.append(Rule((lay, "attn", proj, "bias"), f"{pre}self_attn.{proj}_proj.bias", (heads, hd),
                                  (heads * hd,), (2,)))
        rules.append(Rule((lay, "attn", "o", "kernel"), pre + "self_attn.o_proj.weight", (h, hd, d), (d, h * hd),
                          (2, 1), transpose=True))
        if fam.qk_norm:
            rules += [vec(("attn", "q_norm", "scale"), "self_attn.q_norm.weight", hd),
                      vec(("attn", "k_norm", "scale"), "self_attn.k_norm.weight", hd)]
        if fam.post_norms:  # Gemma 2's sandwich: HF's post_attention_layernorm is the norm *after* attention
            rules += [vec(("post_attn_norm", "scale"), "post_attention_layernorm.weight", d),
                      vec(("mlp_norm", "scale"), "pre_feedforward_layernorm.weight", d),
                      vec(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", d)]
        else:
            rules.append(vec(("mlp_norm", "scale"), "post_attention_layernorm.weight", d))
        for proj, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
            rules.append(Rule((lay, "mlp", proj, "kernel"), f"{pre}mlp.{proj}_proj.weight", shape, shape[::-1],
                              (1, 1), transpose=True))
    rules.append(Rule(("final_norm", "scale"), "model.norm.weight", (d,), (d,), (1,)))
    if not cfg.tie_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", (d, v), (v, d), (1, 1), transpose=True))
    return rules


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    """GPT-2: Conv1D weights are [in, out] (no transpose); c_attn holds q, k, v side by side."""
    d, h, hd, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
    rules = [Rule(("embed", "embedding"), "transformer.wte.weight", (v, d), (v, d), (1, 1)),
             Rule(("pos_embed", "embedding"), "transformer.wpe.weight", (cfg.max_seq_len, d), (cfg.max_seq_len, d),
                  (1, 1))]
    for i in range(cfg.n_layers):
        lay, pre = f"layers_{i}", f"transformer.h.{i}."
        vec = lambda leaf, name, n, lay=lay, pre=pre: Rule((lay, *leaf), pre + name, (n,), (n,), (1,))
        rules += [vec(("attn_norm", "scale"), "ln_1.weight", d), vec(("attn_norm", "bias"), "ln_1.bias", d)]
        for j, proj in enumerate("qkv"):
            rules.append(Rule((lay, "attn", proj, "kernel"), pre + "attn.c_attn.weight", (d, h, hd), (d, 3 * d),
                              (1, 2), part=(1, j * d, (j + 1) * d)))
            rules.append(Rule((lay, "attn", proj, "bias"), pre + "attn.c_attn.bias", (h, hd), (3 * d,), (2,),
                              part=(0, j * d, (j + 1) * d)))
        rules += [Rule((lay, "attn", "o", "kernel"), pre + "attn.c_proj.weight", (h, hd, d), (d, d), (2, 1)),
                  vec(("attn", "o", "bias"), "attn.c_proj.bias", d),
                  vec(("mlp_norm", "scale"), "ln_2.weight", d), vec(("mlp_norm", "bias"), "ln_2.bias", d),
                  Rule((lay, "mlp", "up", "kernel"), pre + "mlp.c_fc.weight", (d, f), (d, f), (1, 1)),
                  vec(("mlp", "up", "bias"), "mlp.c_fc.bias", f),
                  Rule((lay, "mlp", "down", "kernel"), pre + "mlp.c_proj.weight", (f, d), (f, d), (1, 1)),
                  vec(("mlp", "down", "bias"), "mlp.c_proj.bias", d)]
    rules += [Rule(("final_norm", "scale"), "transformer.ln_f.weight", (d,), (d,), (1,)),
              Rule(("final_norm", "bias"), "transformer.ln_f.bias", (d,), (d,), (1,))]
    return rules


def hf_tensors(rules: list[Rule]) -> Iterator[tuple[str, tuple[int, ...], list[Rule]]]:
    """(HF name, shape, the rules whose parts make it up, in part order), in the rules' order."""
    by_name: dict[str, list[Rule]] = {}
    for rule in rules:
        by_name.setdefault(rule.name, []).append(rule)
    for name, parts in by_name.items():
        yield name, parts[0].hf_shape, sorted(parts, key=lambda r: r.part[1] if r.part else 0)


def assemble(parts: list[Rule], values: list[np.ndarray]) -> np.ndarray:
    """One HF tensor from its rules' leaf values (concatenated along the fused axis when there are parts)."""
    pieces = [rule.to_hf(value) for rule, value in zip(parts, values, strict=True)]
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate(pieces, axis=parts[0].part[0])


def leaf_shapes(rules: list[Rule]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Leaf path -> shape in the per-layer layout."""
    return {r.leaf: r.lm_shape for r in rules}


def stacked_path(leaf: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """A per-layer path ("layers_3", ...) -> (the scan-stacked path ("layers", ...), 3); others -> (leaf, None)."""
    head = leaf[0]
    if head.startswith("layers_") and head[7:].isdigit():
        return ("layers", *leaf[1:]), int(head[7:])
    return leaf, None


def tree_set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[p0][p1]... = value, creating dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
