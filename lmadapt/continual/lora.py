"""LoRA adapters: a separate params tree of low-rank factors, merged into the base weights functionally.

    lora = init_lora(params, TARGETS, rank=8, rng=key)                 # B = 0: the merged model equals the base
    logits = model.apply({"params": merge(params, lora, lora_scale(alpha=16, rank=8))}, tokens)

Train `lora` alone by differentiating through `merge` (the base params stay fixed); export by merging once.

Layout. The lora tree mirrors the params paths of the adapted projections, one {"a", "b"} entry per kernel:
lora["layers_0"]["attn"]["q"] = {"a": A, "b": B}. A projection kernel W splits into input and output axes
following the einsum equations of `lmadapt.model` (see `PROJECTIONS`):

    q, k, v   W [d_model, heads, head_dim]     "btd,dhk->bthk"   in (d_model,)          out (heads, head_dim)
    o         W [heads, head_dim, d_model]     "bthk,hkd->btd"   in (heads, head_dim)   out (d_model,)
    gate, up  W [d_model, d_ff]                "btd,df->btf"     in (d_model,)          out (d_ff,)
    down      W [d_ff, d_model]                "btf,fd->btd"     in (d_ff,)             out (d_model,)
    lm_head   W [d_model, vocab]               "btd,dv->btv"     (supported, not in the default TARGETS)

and gets A [*lead, *in, rank], B [*lead, rank, *out], the update being W + scale * (A contracted with B over rank).
GPT-2's MLP is up/down (no gate) and Llama's gate/up/down; a target a family lacks is simply absent. `lead` is
any leading axes of the kernel: the layer axis of `scan_layers` params ({"layers": ...} stacked on axis 0), so
stacked params get stacked adapters, lora["layers"]["attn"]["q"]["a"] of shape [n_layers, d_model, rank].

Init. B = 0 (the merged model is exactly the base model at step 0) and A ~ Normal(0, init_std) with
init_std = 1 / sqrt(fan_in), fan_in = prod(in) by default: the Kaiming-style scale (as the reference LoRA's
kaiming-uniform A), which keeps x @ A of the size of x per rank component, so B's first gradients neither
vanish nor explode whatever the width. Adapters are float32 by default whatever the params' dtype.

Dtypes. `merge` computes W + scale * A B in float32 (HIGHEST matmul precision) and casts to W's dtype.

As a continual method (`LoRA`, at the end): `continual.lora.{rank, alpha, targets}`; the run's trainable params
are {"base": the model's params (frozen), "lora": adapters}, merged before every forward pass, and the version
publishes the merged params plus the adapters (artifact "lora", what `lmadapt.hf.peft` exports).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.continual.method import Layout

if TYPE_CHECKING:
    from lmadapt.config import Config
    from lmadapt.lineage.origin import Origin

__all__ = ["PROJECTIONS", "TARGETS", "LoRA", "box_lora", "delta", "init_lora", "lora_scale", "merge"]

# Projection name -> (number of input axes, number of output axes) of its kernel, from lmadapt.model.
PROJECTIONS: dict[str, tuple[int, int]] = {
    "q": (1, 2), "k": (1, 2), "v": (1, 2), "o": (2, 1),
    "gate": (1, 1), "up": (1, 1), "down": (1, 1),
    "lm_head": (1, 1),
}
# The default targets: every attention and MLP projection of both families.
TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

LoraEntry = dict[str, jax.Array]  # {"a": [*lead, *in, rank], "b": [*lead, rank, *out]}


def lora_scale(alpha: float, rank: int) -> float:
    """The usual LoRA scale alpha / rank."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / rank


def _value(leaf: Any) -> Any:
    return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def _adapted(params: Mapping[str, Any], targets: Sequence[str]) -> list[tuple[tuple[str, ...], str, Any]]:
    """(path of the projection module, its name, its kernel) for every targeted projection, in sorted-key order."""
    found: list[tuple[tuple[str, ...], str, Any]] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key in sorted(node):
            child = node[key]
            if not isinstance(child, Mapping):
                continue
            if key in targets and "kernel" in child:
                found.append(((*path, key), key, child["kernel"]))
            else:
                walk(child, (*path, key))

    walk(params, ())
    return found


def _split_shape(name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, tuple[int, ...],
                                                                                   tuple[int, ...]]:
    """(number of leading axes, input shape, output shape) of a projection kernel."""
    n_in, n_out = PROJECTIONS[name]
    lead = len(shape) - n_in - n_out
    if lead < 0:
        raise ValueError(f"kernel at {'/'.join(path)} has shape {shape}; a {name!r} projection needs at least "
                         f"{n_in + n_out} axes")
    return lead, shape[lead:lead + n_in], shape[lead + n_in:]


def init_lora(params: Mapping[str, Any], targets: Sequence[str], rank: int, rng: jax.Array, *,
              init_std: float | None = None, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Adapters for every `targets` projection found in `params` (boxed or plain; only shapes are read).

    A ~ Normal(0, init_std) (None: 1 / sqrt(fan_in), see the module docstring), B = 0, both `dtype`. The A's
    are consecutive slices, in sorted path order, of one normal draw from `rng`. Jit-friendly.
    Raises ValueError for an unknown target name, a non-positive rank, or when no target is found.
    """
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {sorted(PROJECTIONS)}")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    adapted = _adapted(params, tuple(targets))
    if not adapted:
        raise ValueError(f"no projection named {list(targets)} with a kernel in params")
    specs = []
    for path, name, kernel in adapted:
        shape = tuple(np.shape(_value(kernel)))
        lead, in_shape, out_shape = _split_shape(name, path, shape)
        std = 1.0 / math.sqrt(math.prod(in_shape)) if init_std is None else float(init_std)
        specs.append(((*shape[:lead], *in_shape, rank), (*shape[:lead], rank, *out_shape), std))
    factors = _draw_factors(rng, tuple(specs), jnp.dtype(dtype))
    lora: dict[str, Any] = {}
    for (path, _, _), (a, b) in zip(adapted, factors, strict=True):
        node = lora
        for key in path:
            node = node.setdefault(key, {})
        node.update(a=a, b=b)
    return lora


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_factors(rng: jax.Array, specs: tuple[tuple[tuple[int, ...], tuple[int, ...], float], ...],
                  dtype: np.dtype) -> list[tuple[jax.Array, jax.Array]]:
    """(A, B = 0) per (a_shape, b_shape, std) spec: the A's are consecutive slices of one standard-normal draw
    (a single RNG op keeps the compile short: per-adapter draws cost seconds of XLA compile on CPU), each scaled
    by its std."""
    sizes = [math.prod(a_shape) for a_shape, _, _ in specs]
    flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0, *sizes])
    return [((std * flat[lo:hi].reshape(a_shape)).astype(dtype), jnp.zeros(b_shape, dtype))
            for (a_shape, b_shape, std), lo, hi in zip(specs, offsets[:-1], offsets[1:], strict=True)]


def delta(lora_entry: Mapping[str, jax.Array], scale: float | jax.Array, *, lead_axes: int = 0) -> jax.Array:
    """scale * A B contracted over rank, in float32: shape [*lead, *in, *out] (the kernel's shape).

    lead_axes: how many leading (e.g. stacked-layer) axes A and B share; `merge` infers it from the kernel.
    """
    a, b = jnp.asarray(lora_entry["a"], jnp.float32), jnp.asarray(lora_entry["b"], jnp.float32)
    n_in, n_out = a.ndim - lead_axes - 1, b.ndim - lead_axes - 1
    if n_in < 0 or n_out < 0 or a.shape[:lead_axes] != b.shape[:lead_axes] or a.shape[-1] != b.shape[lead_axes]:
        raise ValueError(f"LoRA factors do not fit together: a {a.shape}, b {b.shape}, lead_axes {lead_axes}")
    letters = iter(string.ascii_letters)
    lead = "".join(next(letters) for _ in range(lead_axes))
    ins = "".join(next(letters) for _ in range(n_in))
    outs = "".join(next(letters) for _ in range(n_out))
    r = next(letters)
    ab = jnp.einsum(f"{lead}{ins}{r},{lead}{r}{outs}->{lead}{ins}{outs}", a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.asarray(scale, jnp.float32) * ab


def _is_entry(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"a", "b"} and not isinstance(node["a"], Mapping)


def _merge_kernel(kernel: Any, entry: Mapping[str, jax.Array], scale: float | jax.Array, where: str) -> Any:
    w = _value(kernel)
    lead = jnp.ndim(entry["a"]) + jnp.ndim(entry["b"]) - 2 - jnp.ndim(w)
    if lead < 0:
        raise ValueError(f"LoRA entry at {where} does not fit kernel {jnp.shape(w)}")
    d = delta(entry, scale, lead_axes=lead)
    if d.shape != jnp.shape(w):
        raise ValueError(f"LoRA update at {where} has shape {d.shape}, kernel has {jnp.shape(w)}")
    merged = (jnp.asarray(w, jnp.float32) + d).astype(jnp.result_type(w))
    return kernel.replace_boxed(merged) if isinstance(kernel, nn.Partitioned) else merged


def merge(params: Mapping[str, Any], lora: Mapping[str, Any], scale: float | jax.Array) -> dict[str, Any]:
    """params with W + scale * A B (float32, cast back to W's dtype) at every adapted kernel; all else unchanged
    (the very same leaf objects). Boxed params stay boxed. Differentiable in `lora` (and `params`); jit-friendly.

    Raises ValueError when an adapter's path is missing from params or its shapes do not fit the kernel.
    """

    def walk(p: Mapping[str, Any], node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = dict(p)
        if _is_entry(node):
            if "kernel" not in p:
                raise ValueError(f"params have no kernel at {'/'.join(path)} for a LoRA adapter")
            out["kernel"] = _merge_kernel(p["kernel"], node, scale, "/".join(path))
            return out
        for key, child in node.items():
            if key not in p or not isinstance(p[key], Mapping):
                raise ValueError(f"params have no module at {'/'.join((*path, key))} for a LoRA adapter")
            out[key] = walk(p[key], child, (*path, key))
        return out

    return walk(params, lora, ())


def box_lora(params: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, Any]:
    """The lora tree with `nn.Partitioned` leaves carrying logical axis names derived from the boxed base kernel:
    A gets (*lead, *in names, None), B (*lead, None, *out names), the rank axis unsharded (None).

    Lets `nn.get_partition_spec` / `lmadapt.sharding` shard adapters like their kernels (e.g. "layers" first).
    """

    def walk(p: Mapping[str, Any], node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        if _is_entry(node):
            kernel = p["kernel"]
            if not isinstance(kernel, nn.Partitioned):
                raise ValueError(f"box_lora needs boxed params (nn.Partitioned); {'/'.join(path)} is not")
            names = tuple(kernel.names)
            lead = jnp.ndim(node["a"]) + jnp.ndim(node["b"]) - 2 - len(names)
            n_in = jnp.ndim(node["a"]) - lead - 1
            a_names = (*names[:lead + n_in], None)
            b_names = (*names[:lead], None, *names[lead + n_in:])
            return {"a": nn.Partitioned(node["a"], a_names, kernel.mesh),
                    "b": nn.Partitioned(node["b"], b_names, kernel.mesh)}
        return {key: walk(p[key], child, (*path, key)) for key, child in node.items()}

    return walk(params, lora, ())


@dataclasses.dataclass(frozen=True)
class LoRA(Layout):
    """The LoRA method: train adapters on `targets` of a frozen base (the start version's params)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    name = "lora"
    # Selectors for optimizer.groups: adapters and base params (paths in the {"base", "lora"} layout).
    SELECTORS = {"lora": lambda p: p.startswith("lora/"), "base": lambda p: p.startswith("base/")}
    frozen = ("base",)

    @classmethod
    def from_config(cls, cfg: Config, origin: Origin | None) -> LoRA | None:
        c = cfg.continual.lora
        return cls(c.rank, c.alpha, tuple(c.targets)) if c.rank else None

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    def wrap(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        # B = 0: the merged model is the base model at step 0.
        return {"base": params, "lora": init_lora(params, self.targets, self.rank, rng)}

    def wrap_shapes(self, params: Any, rng: jax.Array) -> dict[str, Any]:
        # Unboxed inside the trace: unboxing abstract values eagerly would apply sharding constraints.
        adapters = jax.eval_shape(lambda p, r: init_lora(nn.unbox(p), self.targets, self.rank, r), params, rng)
        return {"base": params, "lora": adapters}

    def model_params(self, params: Any) -> Any:
        return params["base"]

    def effective(self, params: Any) -> Any:
        return merge(params["base"], params["lora"], self.scale)

    def publishable(self, params: Any) -> tuple[Any, dict[str, Any]]:
        return self.effective(params), {"lora": params["lora"]}

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
