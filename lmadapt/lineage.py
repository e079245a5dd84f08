"""A lineage of immutable model versions: params (Orbax), tokenizer, model config and a JSON record.

    <lineage dir>/
      versions/<id>/record.json    id, parents, created, run config, data, strategy, steps, tokens, metrics,
                                   params content hash
      versions/<id>/params/        Orbax checkpoint of the params (restores onto any mesh)
      versions/<id>/artifacts/<name>/   optional named pytrees (EWC Fisher, LoRA adapters, ...)
      versions/<id>/tokenizer.json + tokenizer_config.json | tokenizer.model | tokenizer.bytes
      versions/<id>/MANIFEST.json  size and sha256 of every file above: checked before a version is read
      metrics/<id>.json            evaluation results added later (the version itself never changes)

A version is written into `.staging/<id>.<nonce>` and renamed into `versions/<id>` in one step, so a
crash leaves no half version, an id that exists is refused before anything is written, and of two
processes publishing one id at once exactly one succeeds (the rename onto a non-empty directory fails).
Reading a version first checks its manifest: a damaged file, a pickle or a symlink out of the lineage
stops the read with an error naming the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmadapt import manifest
from lmadapt.checkpoint import check_tree_matches
from lmadapt.config import ModelConfig, section_from_dict
from lmadapt.model import stack_layers, unstack_layers
from lmadapt.tokenizer import Tokenizer, load_tokenizer

VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RECORD, MANIFEST = "record.json", manifest.MANIFEST
OWNER = "owner.json"  # in a staging directory: which host and process is writing it


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
        self._checked: set[str] = set()  # versions whose files were verified by this object

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
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise LineageError(f"{path}: unreadable record ({e}); `tools/lineage.py verify {version_id}` checks "
                               f"the version") from None
        if not isinstance(record, dict):
            raise LineageError(f"{path}: the record is not a JSON object")
        return record

    def check_intact(self, version_id: str) -> None:
        """Raise LineageError naming the first damaged, missing, added or untrusted file of a version
        (once per version and Lineage object: the files never change after publishing)."""
        if version_id in self._checked:
            return
        self.record(version_id)
        problems = manifest.check(self.path(version_id))
        if problems:
            raise LineageError(f"version {version_id!r} of lineage {self.directory} is damaged and was not read: "
                               f"{manifest.summary(problems)}; `python tools/lineage.py --dir {self.directory} "
                               f"verify {version_id}` lists every problem")
        self._checked.add(version_id)

    def model_config(self, version_id: str) -> ModelConfig:
        return section_from_dict(ModelConfig, self.record(version_id)["model"], f"version {version_id}", "model.")

    def tokenizer(self, version_id: str) -> Tokenizer:
        self.check_intact(version_id)
        return load_tokenizer(self.path(version_id))

    def parents(self, version_id: str) -> list[str]:
        return list(self.record(version_id)["parents"])

    def ancestry(self, version_id: str) -> list[str]:
        """The version and its first-parent chain back to a root, newest first."""
        chain = [version_id]
        while parents := self.parents(chain[-1]):
            chain.append(parents[0])
        return chain

    def load_params(self, version_id: str, target: Any | None = None, scan_layers: bool | None = None, *,
                    check: bool = True) -> Any:
        """Params of a version. `target`: a tree of ShapeDtypeStructs with shardings (restores each shard
        straight onto its devices, on any mesh); `scan_layers`: the layout wanted, converted if the
        version was saved in the other one; without a target, host (numpy) arrays, whatever devices the
        version was saved from. Mismatched shapes or dtypes, and (with `check`) a damaged version, raise
        LineageError."""
        if check:
            self.check_intact(version_id)
        record = self.record(version_id)
        saved_scan = record["model"].get("scan_layers", False)
        path = os.path.join(self.path(version_id), "params")
        want_scan = saved_scan if scan_layers is None else scan_layers
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(path).item_metadata
            if target is not None and want_scan == saved_scan:
                _check_same_tree(saved, target, f"version {version_id!r}")
                return ckptr.restore(path, target)
            params = ckptr.restore(path, _local_target(saved))
        # Host copies: single-device arrays would be refused beside a run's mesh (stacking, placing, jit).
        params = jax.device_get(params)
        if want_scan != saved_scan:
            params = stack_layers(params) if want_scan else unstack_layers(params)
        if target is not None:
            _check_same_tree(params, target, f"version {version_id!r}")
            params = jax.device_put(params, jax.tree.map(lambda t: t.sharding, target))
        return params

    def load_artifact(self, version_id: str, name: str, target: Any | None = None) -> Any:
        """A named artifact; with `target` (ShapeDtypeStructs with shardings) restored onto those devices."""
        path = os.path.join(self.path(version_id), "artifacts", check_version_id(name))
        self.check_intact(version_id)
        if not os.path.isdir(path):
            have = self.record(version_id).get("artifacts", [])
            raise LineageError(f"version {version_id!r} has no artifact {name!r} (it has {have or 'none'})")
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:  # host copies, as load_params gives
                return jax.device_get(ckptr.restore(path, _local_target(ckptr.metadata(path).item_metadata)))
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
        # A staging directory of its own per publish (the nonce is shared by the job's processes), so two
        # jobs publishing at once never write into one directory.
        staging = os.path.join(self.directory, ".staging", f"{version_id}.{_shared_nonce():016x}")
        if lead:
            _remove_abandoned_staging(os.path.dirname(staging))
            os.makedirs(staging)
            _write_json(os.path.join(staging, OWNER), {"host": socket.gethostname(), "pid": os.getpid()})
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
        failed = ""
        if lead:
            os.remove(os.path.join(staging, OWNER))
            tokenizer.save(staging)
            _write_json(os.path.join(staging, RECORD), record)
            manifest.write(staging)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(staging, final)  # the commit: atomic, and refuses an existing non-empty target
            except OSError as e:
                shutil.rmtree(staging, ignore_errors=True)
                failed = (f"version {version_id!r} was published to {final} by another process while this one was "
                          f"writing it; this copy was discarded: choose another version.id" if os.path.exists(final)
                          else f"version {version_id!r} could not be committed to {final}: {e}")
        _sync("lineage-commit")
        if failed:
            raise LineageError(failed)
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
        pickle files or symlinks out of the lineage, and a params content hash that no longer matches."""
        problems = manifest.check(self.path(version_id))
        try:
            digest = params_hash(self.load_params(version_id, check=False))
            if digest != self.record(version_id)["params_hash"]:
                problems.append(f"params: content hash {digest[:19]}... differs from the record's "
                                f"{self.record(version_id)['params_hash'][:19]}...")
        except Exception as e:  # a damaged checkpoint may fail anywhere inside Orbax/TensorStore
            problems.append(f"params: cannot be read ({type(e).__name__}: {str(e)[:200]})")
        return problems


def _shared_nonce() -> int:
    """A random 64-bit number, the same on every process of the job."""
    nonce = np.array(secrets.randbits(63), dtype=np.int64)
    if jax.process_count() > 1:
        nonce = multihost_utils.broadcast_one_to_all(nonce)
    return int(nonce)


def _remove_abandoned_staging(root: str) -> None:
    """Delete staging directories left by publishes that crashed on this host (their process is gone);
    those of live processes, or of other hosts, are left alone."""
    if not os.path.isdir(root):
        return
    host = socket.gethostname()
    for name in os.listdir(root):
        try:
            with open(os.path.join(root, name, OWNER), encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # being committed right now, or not ours to judge
        if owner.get("host") == host and not _pid_alive(int(owner.get("pid", 0))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _write_json(path: str, obj: Any) -> None:
    manifest.write_json(path, obj, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_same_tree(saved: Any, target: Any, what: str) -> None:
    check_tree_matches(saved, target, what, LineageError)


def _local_target(metadata: Any) -> Any:
    """Restore targets on this process's first device, from a checkpoint's metadata. Without a target Orbax
    restores onto the saving run's device layout, which fails on a machine with other devices (a version
    trained on 8 GPUs, exported on a laptop)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata)
