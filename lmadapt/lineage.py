"""A lineage of immutable model versions: params (Orbax), tokenizer, model config and a JSON record.

    <lineage dir>/
      versions/<id>/record.json    id, parents, created, run config, data, strategy, steps, tokens, metrics,
                                   params content hash
      versions/<id>/params/        Orbax checkpoint of the params (restores onto any mesh)
      versions/<id>/artifacts/<name>/   optional named pytrees (EWC Fisher, LoRA adapters, ...)
      versions/<id>/tokenizer.model | tokenizer.bytes
      versions/<id>/MANIFEST.json  size and sha256 of every file above: `verify` recomputes them
      metrics/<id>.json            evaluation results added later (the version itself never changes)

A version is written into `.staging/<id>` and renamed into `versions/<id>` in one step, so a crash
leaves no half version, and an id that exists is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmadapt.checkpoint import check_tree_matches
from lmadapt.config import ModelConfig, section_from_dict
from lmadapt.model import stack_layers, unstack_layers
from lmadapt.tokenizer import Tokenizer, load_tokenizer

VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RECORD, MANIFEST = "record.json", "MANIFEST.json"


class LineageError(ValueError):
    """A lineage operation cannot be done; the message names the version and the reason."""


def check_version_id(version_id: str) -> str:
    """Version ids name directories: letters, digits, '_', '-', '.', no path separators, no '..'."""
    if not isinstance(version_id, str) or not VERSION_ID.fullmatch(version_id) or ".." in version_id:
        raise LineageError(f"version id {version_id!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', "
                           f"starting with a letter or digit, without '..'")
    return version_id


def params_hash(params: Any) -> str:
    """Content hash of a params tree: paths, dtypes, shapes and bytes of every leaf (layout-independent
    of sharding: the arrays are gathered to the host first)."""
    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = _host(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "sha256:" + h.hexdigest()


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


@dataclasses.dataclass
class Lineage:
    """The versions under one directory."""

    directory: str

    def __post_init__(self) -> None:
        self.directory = os.path.abspath(os.path.expanduser(self.directory))

    # -- reading -------------------------------------------------------------------------------

    def path(self, version_id: str) -> str:
        return os.path.join(self.directory, "versions", check_version_id(version_id))

    def exists(self, version_id: str) -> bool:
        return os.path.isfile(os.path.join(self.path(version_id), RECORD))

    def ids(self) -> list[str]:
        """Every published version, oldest first."""
        root = os.path.join(self.directory, "versions")
        if not os.path.isdir(root):
            return []
        ids = [v for v in os.listdir(root) if os.path.isfile(os.path.join(root, v, RECORD))]
        return sorted(ids, key=lambda v: (self.record(v)["created"], v))

    def record(self, version_id: str) -> dict[str, Any]:
        """The version's JSON record (raises LineageError naming the lineage if there is no such version)."""
        path = os.path.join(self.path(version_id), RECORD)
        if not os.path.isfile(path):
            known = ", ".join(self.ids()[-10:]) if os.path.isdir(os.path.join(self.directory, "versions")) else ""
            raise LineageError(f"lineage {self.directory}: no version {version_id!r}"
                               + (f" (latest: {known})" if known else " (the lineage is empty)"))
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def model_config(self, version_id: str) -> ModelConfig:
        return section_from_dict(ModelConfig, self.record(version_id)["model"], f"version {version_id}", "model.")

    def tokenizer(self, version_id: str) -> Tokenizer:
        return load_tokenizer(self.path(version_id))

    def parents(self, version_id: str) -> list[str]:
        return list(self.record(version_id)["parents"])

    def ancestry(self, version_id: str) -> list[str]:
        """The version and its first-parent chain back to a root, newest first."""
        chain = [version_id]
        while parents := self.parents(chain[-1]):
            chain.append(parents[0])
        return chain

    def load_params(self, version_id: str, target: Any | None = None, scan_layers: bool | None = None) -> Any:
        """Params of a version. `target`: a tree of ShapeDtypeStructs with shardings (restores each shard
        straight onto its devices, on any mesh); `scan_layers`: the layout wanted, converted if the
        version was saved in the other one. Mismatched shapes or dtypes raise LineageError."""
        record = self.record(version_id)
        saved_scan = record["model"].get("scan_layers", False)
        path = os.path.join(self.path(version_id), "params")
        want_scan = saved_scan if scan_layers is None else scan_layers
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(path).item_metadata
            if target is not None and want_scan == saved_scan:
                _check_same_tree(saved, target, f"version {version_id!r}")
                return ckptr.restore(path, target)
            params = ckptr.restore(path)
        if want_scan != saved_scan:
            params = stack_layers(params) if want_scan else unstack_layers(params)
        if target is not None:
            _check_same_tree(params, target, f"version {version_id!r}")
            params = jax.device_put(params, jax.tree.map(lambda t: t.sharding, target))
        return params

    def load_artifact(self, version_id: str, name: str, target: Any | None = None) -> Any:
        """A named artifact; with `target` (ShapeDtypeStructs with shardings) restored onto those devices."""
        path = os.path.join(self.path(version_id), "artifacts", check_version_id(name))
        if not os.path.isdir(path):
            have = self.record(version_id).get("artifacts", [])
            raise LineageError(f"version {version_id!r} has no artifact {name!r} (it has {have or 'none'})")
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(path)
            _check_same_tree(ckptr.metadata(path).item_metadata, target, f"artifact {name!r} of {version_id!r}")
            return ckptr.restore(path, target)

    def metrics(self, version_id: str) -> dict[str, Any]:
        """Evaluation results added after publishing (keyed by dataset fingerprint), plus the record's own."""
        path = os.path.join(self.directory, "metrics", f"{check_version_id(version_id)}.json")
        later = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                later = json.load(f)
        return {**self.record(version_id).get("metrics", {}), **later}

    # -- writing -------------------------------------------------------------------------------

    def publish(self, version_id: str, params: Any, model: ModelConfig, tokenizer: Tokenizer, *,
                parents: list[str], config: dict | None = None, data: dict | None = None,
                strategy: dict | None = None, steps: int = 0, tokens: int = 0, metrics: dict | None = None,
                note: str = "", artifacts: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write a new version atomically and return its record. Every process must call it (Orbax saves
        are collective); process 0 writes the small files and commits. An existing id is an error."""
        check_version_id(version_id)
        for p in parents:
            if not self.exists(p):
                raise LineageError(f"parent version {p!r} of {version_id!r} is not in lineage {self.directory}")
        final = self.path(version_id)
        if os.path.exists(final):
            raise LineageError(f"version {version_id!r} already exists in lineage {self.directory}; versions are "
                               f"written once: choose another version.id")
        lead = jax.process_index() == 0
        staging = os.path.join(self.directory, ".staging", version_id)
        if lead:
            shutil.rmtree(staging, ignore_errors=True)  # left by a publish that crashed
            os.makedirs(staging)
        _sync("lineage-staging")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(staging, "params"), params)
            for name, tree in (artifacts or {}).items():
                check_version_id(name)
                ckptr.save(os.path.join(staging, "artifacts", name), tree)
            ckptr.wait_until_finished()
        digest = params_hash(params)
        record = {
            "id": version_id, "parents": list(parents),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            "note": note, "model": dataclasses.asdict(model), "tokenizer": tokenizer.fingerprint,
            "config": config or {}, "data": data or {}, "strategy": strategy or {}, "steps": int(steps),
            "tokens": int(tokens), "metrics": metrics or {}, "params_hash": digest,
            "artifacts": sorted(artifacts or {}), **(extra or {}),
        }
        if lead:
            tokenizer.save(staging)
            _write_json(os.path.join(staging, RECORD), record)
            _write_json(os.path.join(staging, MANIFEST), _manifest(staging))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(staging, final)  # the commit: atomic, and refuses an existing non-empty target
            except OSError as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise LineageError(f"version {version_id!r} could not be committed to {final}: {e}") from None
        _sync("lineage-commit")
        return record

    def add_metrics(self, version_id: str, key: str, values: dict[str, Any]) -> None:
        """Record evaluation results for a version under `key` (e.g. a dataset fingerprint)."""
        current = self.metrics(version_id)
        path = os.path.join(self.directory, "metrics", f"{check_version_id(version_id)}.json")
        later = {k: v for k, v in current.items() if k not in self.record(version_id).get("metrics", {})}
        later[key] = values
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json(path, later)

    # -- checking ------------------------------------------------------------------------------

    def verify(self, version_id: str) -> list[str]:
        """Problems found in a version (empty if intact): files changed, missing or added since publishing,
        and a params content hash that no longer matches the record."""
        root = self.path(version_id)
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            expected = json.load(f)
        actual = _manifest(root)
        problems = [f"{p}: missing" for p in sorted(set(expected) - set(actual))]
        problems += [f"{p}: not in the manifest (added after publishing)" for p in sorted(set(actual) - set(expected))]
        problems += [f"{p}: contents changed (sha256 {actual[p]['sha256'][:12]}..., published "
                     f"{expected[p]['sha256'][:12]}...)" for p in sorted(set(actual) & set(expected))
                     if actual[p] != expected[p]]
        try:
            digest = params_hash(self.load_params(version_id))
            if digest != self.record(version_id)["params_hash"]:
                problems.append(f"params: content hash {digest[:19]}... differs from the record's "
                                f"{self.record(version_id)['params_hash'][:19]}...")
        except Exception as e:  # a damaged checkpoint may fail anywhere inside Orbax/TensorStore
            problems.append(f"params: cannot be read ({type(e).__name__}: {str(e)[:200]})")
        return problems


def _manifest(root: str) -> dict[str, dict[str, Any]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel == MANIFEST:
                continue
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = {"bytes": os.path.getsize(full), "sha256": h.hexdigest()}
    return dict(sorted(out.items()))


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_same_tree(saved: Any, target: Any, what: str) -> None:
    check_tree_matches(saved, target, what, LineageError)
