"""A LoRA version's adapters as a PEFT adapter directory, which `peft.PeftModel.from_pretrained(base, DIR)` loads.

    export_peft("out/adapter", lora, cfg, alpha=16.0, base_model_name_or_path="out/base")
    adapter, note = version_adapter(lineage, "v3")   # rank, alpha and base from the version and its parent
    adapter.write("out/merged/adapter")

DIR gets `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules as HF module
names, bias "none", fan_in_fan_out false, no rslora/DoRA) and `adapter_model.safetensors` with PEFT's key names:
`base_model.model.<HF module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], float32.

Why this is the same function: an lmadapt adapter on kernel W [*in, *out] adds scale * A B with A [*in, r],
B [r, *out] and scale = alpha / rank (`lmadapt.continual.lora.lora_scale`). The HF weight of that kernel is
W.reshape(in, out).T (`lmadapt.hf.rules`: q/k/v/o/gate/up/down are reshaped and transposed, nothing else), so
its update is scale * (B.reshape(r, out).T) (A.reshape(in, r).T): PEFT's lora_B [out, r] @ lora_A [r, in] times
its scaling lora_alpha / r (use_rslora false), which is lmadapt's scale when lora_alpha = alpha.
The base the adapter applies to is the LoRA version's parent (the frozen base of the run), exported to HF.

GPT-2 is refused: its q, k and v are one fused `c_attn` Conv1D, which cannot carry lmadapt's separate q/k/v
adapters under PEFT's naming.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lmadapt.config import ModelConfig
from lmadapt.continual.lora import PROJECTIONS
from lmadapt.hf import HFError, rules_for

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "PeftAdapter", "adapter_config", "export_peft",
           "peft_adapter", "peft_state", "unsupported", "version_adapter"]


def _entries(lora: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any, Any]]:
    """(kernel leaf path in the per-layer layout, A, B) of every adapter; a stacked (scan) tree is split per layer."""
    out: list[tuple[tuple[str, ...], Any, Any]] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if set(node) == {"a", "b"} and not isinstance(node["a"], Mapping):
            if path and path[0] == "layers":  # scan layout: axis 0 is the layer
                a, b = np.asarray(node["a"]), np.asarray(node["b"])
                out.extend(((f"layers_{i}", *path[1:], "kernel"), a[i], b[i]) for i in range(a.shape[0]))
            else:
                out.append(((*path, "kernel"), node["a"], node["b"]))
            return
        for key in sorted(node):
            if not isinstance(node[key], Mapping):
                raise HFError(f"LoRA tree: {'/'.join((*path, key))} is not an adapter {{a, b}} or a module")
            walk(node[key], (*path, key))

    walk(lora, ())
    return out


def peft_state(lora: Mapping[str, Any], cfg: ModelConfig) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """(PEFT tensors by name, the rank, the HF module names adapted) of an lmadapt lora tree for model `cfg`.

    HFError for gpt2, an adapter on a kernel the model does not have, shapes that do not fit it, or mixed ranks.
    """
    why = unsupported(cfg)
    if why is not None:
        raise HFError(f"no PEFT adapter: {why}")
    rules = {r.leaf: r for r in rules_for(cfg)}
    state: dict[str, np.ndarray] = {}
    ranks, modules = set(), set()
    for leaf, a, b in _entries(lora):
        rule, where = rules.get(leaf), "/".join(leaf[:-1])
        if rule is None or leaf[-2] not in PROJECTIONS:
            raise HFError(f"LoRA adapter at {where}: the {cfg.family} model has no projection kernel there")
        if not rule.transpose or rule.part is not None or len(rule.hf_shape) != 2:
            raise HFError(f"LoRA adapter at {where}: HF tensor {rule.name} is not a plain torch Linear weight")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rank = a.shape[-1]
        out_features, in_features = rule.hf_shape
        if a.size != in_features * rank or b.size != rank * out_features or b.shape[0] != rank:
            raise HFError(f"LoRA adapter at {where}: a {a.shape} and b {b.shape} do not fit kernel "
                          f"{rule.lm_shape} ({rule.name} is [{out_features}, {in_features}])")
        module = rule.name.removesuffix(".weight")
        state[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(in_features, rank).T)
        state[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, out_features).T)
        ranks.add(rank)
        modules.add(module.rsplit(".", 1)[-1])
    if not state:
        raise HFError("the LoRA tree holds no adapters")
    if len(ranks) != 1:
        raise HFError(f"LoRA adapters of different ranks {sorted(ranks)}: PEFT's r is one number")
    return state, ranks.pop(), sorted(modules)


def adapter_config(rank: int, alpha: float, target_modules: list[str], base_model_name_or_path: str | None
                   ) -> dict[str, Any]:
    """adapter_config.json of a plain LoRA (scaling lora_alpha / r, as lmadapt's alpha / rank)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "target_modules": target_modules, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


@dataclasses.dataclass
class PeftAdapter:
    """A converted adapter, ready to write: PEFT tensors and adapter_config.json."""

    state: dict[str, np.ndarray]
    config: dict[str, Any]

    def write(self, directory: str) -> str:
        """Write adapter_model.safetensors and adapter_config.json into `directory` (refused when it exists and is
        not empty; the files appear together through a renamed staging directory); return its path."""
        directory = os.path.abspath(os.path.expanduser(directory))
        if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
            raise HFError(f"{directory}: exists and is not an empty directory; refusing to overwrite")
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            save_file(self.state, os.path.join(tmp, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(self.config, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, directory)  # replaces an empty directory too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory


def peft_adapter(lora: Mapping[str, Any], cfg: ModelConfig, *, alpha: float, rank: int | None = None,
                 base_model_name_or_path: str | None = None) -> PeftAdapter:
    """The PEFT form of `lora` (adapters of a `cfg` model with LoRA scale alpha / rank); `rank`, when given, must
    be the adapters' rank. HFError as `peft_state`."""
    state, found, modules = peft_state(lora, cfg)
    if rank is not None and int(rank) != found:
        raise HFError(f"LoRA adapters have rank {found} but the run recorded rank {rank}")
    return PeftAdapter(state, adapter_config(found, alpha, modules, base_model_name_or_path))


def export_peft(directory: str, lora: Mapping[str, Any], cfg: ModelConfig, *, alpha: float,
                base_model_name_or_path: str | None = None) -> str:
    """Write the PEFT adapter directory of `lora` (see `peft_adapter`); return its path."""
    return peft_adapter(lora, cfg, alpha=alpha, base_model_name_or_path=base_model_name_or_path).write(directory)


def unsupported(cfg: ModelConfig) -> str | None:
    """Why a family has no PEFT adapter form (None: it has one)."""
    if cfg.family == "gpt2":
        return ("gpt2 fuses q, k and v into one c_attn Conv1D, which cannot take lmadapt's separate q/k/v adapters "
                "under PEFT's module names; use the merged export")
    return None


def base_of(lineage: Any, version_id: str) -> tuple[str | None, str | None]:
    """(the parent version the adapters apply to, the Hugging Face directory it was imported from, if any)."""
    parents = lineage.parents(version_id)
    if not parents:
        return None, None
    source = lineage.record(parents[0]).get("source") or {}
    return parents[0], source.get("path") if source.get("kind") == "hf" else None


def version_adapter(lineage: Any, version_id: str, base_model_name_or_path: str | None = None
                    ) -> tuple[PeftAdapter | None, str]:
    """(the PEFT adapter of version `version_id` of `lineage` (a `lmadapt.lineage.store.Lineage`), a line to print).

    (None, "") for a version without a "lora" artifact; (None, why) for a family without a PEFT form (gpt2).
    base_model_name_or_path: what adapter_config.json names as the base; default the Hugging Face directory the
    parent version was imported from, when it was (else null: load the adapter onto the parent's HF export).
    """
    record = lineage.record(version_id)
    if "lora" not in record.get("artifacts", []):
        return None, ""
    cfg = lineage.model_config(version_id)
    why = unsupported(cfg)
    if why is not None:
        return None, f"no PEFT adapter for LoRA version {version_id!r}: {why}"
    settings = record.get("strategy", {}).get("lora")
    if not isinstance(settings, Mapping) or "alpha" not in settings:
        raise HFError(f"version {version_id!r} has a 'lora' artifact but its record has no strategy.lora.alpha: "
                      f"the adapter's scale is unknown")
    parent, source = base_of(lineage, version_id)
    base = base_model_name_or_path or source
    adapter = peft_adapter(lineage.load_artifact(version_id, "lora"), cfg, alpha=float(settings["alpha"]),
                           rank=settings.get("rank"), base_model_name_or_path=base)
    how = (f"base_model_name_or_path {base}" if base else
           f"export the parent with `tools/lineage.py --dir {lineage.directory} export {parent} --out BASE` and load "
           f"the adapter onto it")
    return adapter, (f"PEFT adapter of LoRA version {version_id!r} (r={adapter.config['r']}, lora_alpha="
                     f"{adapter.config['lora_alpha']}) applies to its parent {parent!r}: {how}")
