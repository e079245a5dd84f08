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
crash leaves no half version and an id that exists is refused before anything is written. One job at a
time publishes an id: `.staging/<id>.lock` (flock, naming its holder) is taken before anything is written,
and the rename onto a non-empty directory stays the last defence. A disk without room is refused first; a
write that fails midway removes its staging copy. Reading a version first checks its manifest: a damaged
file, a pickle or a symlink out of the lineage stops the read with an error naming the file. Records are
checked for their required fields when read, and the parent links for loops and missing versions when
walked, published and verified (`lineage_records`). Cached eval results (`metrics/`) count only for the
params they were computed from (`lineage_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import lmadapt.lineage.metrics as lineage_metrics
import lmadapt.lineage.publish as lineage_publish
import lmadapt.lineage.records as lineage_records
from lmadapt.checkpoint import check_tree_matches
from lmadapt.config import ModelConfig, section_from_dict
from lmadapt.data.tokenizers import Tokenizer, load_tokenizer
from lmadapt.files import locks, manifest, paths
from lmadapt.lineage.records import VERSION_ID, LineageError, check_version_id
from lmadapt.model import stack_layers, unstack_layers

__all__ = ["VERSION_ID", "Lineage", "LineageError", "check_version_id", "params_hash"]
RECORD, MANIFEST = "record.json", manifest.MANIFEST


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
        """Whether the id is taken: its directory is there (a damaged version still holds its id)."""
        return os.path.isdir(self.path(version_id))

    def ids(self) -> list[str]:
        """Every published version, oldest first (versions whose record is damaged last, by id: listing a
        lineage must not fail because one record is bad)."""
        ids = self._listed()

        def created(vid: str) -> tuple[int, str, str]:
            try:
                return 0, self.record(vid)["created"], vid
            except LineageError:
                return 1, "", vid

        return sorted(ids, key=created)

    def _listed(self) -> set[str]:
        """The ids of `versions/` (every version directory, whatever its record's state), unsorted."""
        root = os.path.join(self.directory, "versions")
        if not os.path.isdir(root):
            return set()
        return {v for v in os.listdir(root) if VERSION_ID.fullmatch(v) and ".." not in v
                and os.path.isdir(os.path.join(root, v))}

    def record(self, version_id: str) -> dict[str, Any]:
        """The version's JSON record, checked to hold every required field with the right type; raises
        LineageError naming the lineage if there is no such version, or the file and field if it is damaged."""
        path = os.path.join(self.path(version_id), RECORD)
        if self.exists(version_id) and (problem := paths.file_problem(path)):
            raise LineageError(f"{path} {problem}: version {version_id!r} is damaged; `python tools/lineage.py --dir "
                               f"{self.directory} verify` lists every problem")
        if not os.path.isfile(path):
            known = ", ".join(self.ids()[-10:]) if os.path.isdir(os.path.join(self.directory, "versions")) else ""
            raise LineageError(f"lineage {self.directory}: no version {version_id!r}"
                               + (f" (latest: {known})" if known else " (the lineage is empty)"))
        return lineage_records.check_record(lineage_records.read_json_object(path), path, version_id)

    def survey(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
        """(records that read, problems per version) over the whole lineage: damaged records, parents not in
        the lineage, loops of parent links. For listings that must show the healthy versions beside bad ones."""
        records, problems = {}, {}
        for vid in self.ids():
            try:
                records[vid] = self.record(vid)
            except LineageError as e:
                problems[vid] = [str(e)]
        parents_of = self._parents_or_none(records)
        for vid in records:
            found = lineage_records.graph_problems(vid, set(records) | set(problems), parents_of)
            if found:
                problems[vid] = found
        return records, problems

    def graph_problems(self, version_id: str) -> list[str]:
        """What is wrong with a version's parent links: parents not in the lineage, a loop through it."""
        return lineage_records.graph_problems(version_id, self._listed(), self._parents_or_none())

    def _parents_or_none(self, records: dict[str, dict[str, Any]] | None = None
                         ) -> Callable[[str], list[str] | None]:
        """A version's parents, or None where it is missing or its record is damaged (graph walks stop there);
        each record is read once per walk."""
        known: dict[str, list[str] | None] = {} if records is None else {v: r["parents"] for v, r in records.items()}

        def parents_of(vid: str) -> list[str] | None:
            if vid not in known and records is None:
                try:
                    known[vid] = self.record(vid)["parents"] if self.exists(vid) else None
                except LineageError:
                    known[vid] = None
            return known.get(vid)

        return parents_of

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
        """The version's architecture. Its attention kernel is how it was trained, not what it computes (a restart
        may change it too): a version trained with cuDNN on GPUs is read with `auto` on a machine without them."""
        cfg = section_from_dict(ModelConfig, self.record(version_id)["model"], f"version {version_id}", "model.")
        if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
            cfg = dataclasses.replace(cfg, attention="auto")
        return cfg

    def tokenizer(self, version_id: str) -> Tokenizer:
        self.check_intact(version_id)
        return load_tokenizer(self.path(version_id))

    def parents(self, version_id: str) -> list[str]:
        return list(self.record(version_id)["parents"])

    def ancestry(self, version_id: str) -> list[str]:
        """The version and its first-parent chain back to a root, newest first. A chain that loops or names
        a version not in the lineage raises LineageError naming the versions (it never loops forever)."""
        chain = [version_id]
        while parents := self.parents(chain[-1]):
            if parents[0] in chain:
                loop = chain[chain.index(parents[0]):] + [parents[0]]
                raise LineageError(f"lineage {self.directory}: the ancestry of {version_id!r} never reaches a root: "
                                   f"{lineage_records.describe_cycle(loop)}; `tools/lineage.py --dir "
                                   f"{self.directory} verify` lists the problems")
            if not self.exists(parents[0]):
                who = repr(chain[-1]) + (f" (an ancestor of {version_id!r})" if len(chain) > 1 else "")
                raise LineageError(f"lineage {self.directory}: version {who} names parent {parents[0]!r}, which is "
                                   f"not in the lineage")
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

    def metrics(self, version_id: str, *, quiet: bool = False) -> dict[str, Any]:
        """The record's own metrics, plus evaluation results added after publishing (keyed by dataset
        fingerprint) that were computed from this version's params; a damaged metrics file or entry is
        skipped with a warning on stderr (unless `quiet`), never an error."""
        record = self.record(version_id)
        later = lineage_metrics.usable_entries(self.metrics_path(version_id), record["params_hash"], quiet=quiet)
        return {**record.get("metrics", {}), **later}

    def metrics_path(self, version_id: str) -> str:
        """Where evaluation results added after publishing go: `metrics/<id>.json`."""
        return os.path.join(self.directory, "metrics", f"{check_version_id(version_id)}.json")

    # -- writing -------------------------------------------------------------------------------

    def publish(self, version_id: str, params: Any, model: ModelConfig, tokenizer: Tokenizer, *,
                parents: list[str], config: dict | None = None, data: dict | None = None,
                strategy: dict | None = None, steps: int = 0, tokens: int = 0, metrics: dict | None = None,
                note: str = "", artifacts: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write a new version atomically and return its record. Every process must call it (Orbax saves
        are collective); process 0 writes the small files and commits. An existing id, a parent not in the
        lineage or with a damaged record, a loop of parent links, a disk without room, and another job
        publishing the same id are errors raised before anything is written; a write that fails midway
        (disk full, I/O error) removes what it wrote and raises LineageError."""
        self._check_publishable(version_id, parents)
        for name in artifacts or {}:
            check_version_id(name)
        lineage_publish.check_room(self.directory, [params, *(artifacts or {}).values()], version_id)
        lead = jax.process_index() == 0
        lock = os.path.join(self.directory, ".staging", f"{version_id}.lock")
        try:
            if lead:
                os.makedirs(os.path.dirname(lock), exist_ok=True)
            with locks.exclusive_for_job(lock, f"version {version_id!r} of lineage {self.directory}"):
                self._check_publishable(version_id, parents)  # again: another job may have committed it meanwhile
                record = {
                    "id": version_id, "parents": list(parents),
                    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
                    "note": note, "model": dataclasses.asdict(model), "tokenizer": tokenizer.fingerprint,
                    "config": config or {}, "data": data or {}, "strategy": strategy or {}, "steps": int(steps),
                    "tokens": int(tokens), "metrics": metrics or {}, "params_hash": params_hash(params),
                    "artifacts": sorted(artifacts or {}),
                    # which parents: an id deleted and published again names other params (`verify` tells)
                    "parent_hashes": {p: self.record(p)["params_hash"] for p in parents}, **(extra or {}),
                }
                lineage_publish.stage_and_commit(self.directory, self.path(version_id), version_id, params,
                                                 artifacts or {}, tokenizer, record)
                if lead:  # committed: a failure to tidy up must not report the publish as failed
                    # Safe while held: a job that opened the old file is refused by the existence check above.
                    with contextlib.suppress(OSError):
                        os.remove(lock)
        except locks.LockHeld:
            raise LineageError(f"version {version_id!r} is being published to lineage {self.directory} by "
                               f"{locks.holder(lock)} (lock {lock}); one writer per version: wait for it to finish "
                               f"or choose another version.id") from None
        except LineageError:
            raise
        except Exception as e:
            reason = lineage_publish.os_failure(e)
            if reason is None:
                raise
            raise LineageError(f"version {version_id!r} could not be written to lineage {self.directory}: {reason}; "
                               f"nothing was published") from None
        return record

    def _check_publishable(self, version_id: str, parents: list[str]) -> None:
        check_version_id(version_id)
        if not isinstance(parents, list | tuple) or not all(isinstance(p, str) for p in parents):
            raise LineageError(f"parents of {version_id!r}: {parents!r}, expected a list of version ids")
        for p in parents:
            if not self.exists(p):
                raise LineageError(f"parent version {p!r} of {version_id!r} is not in lineage {self.directory}")
            self.record(p)  # a damaged parent record is named before anything is written
        if os.path.exists(self.path(version_id)):
            raise LineageError(f"version {version_id!r} already exists in lineage {self.directory}; versions are "
                               f"written once: choose another version.id")
        # Only a version deleted by hand whose id comes back can close a loop; older loops are refused too.
        known = self._parents_or_none()
        cycle = lineage_records.first_cycle([version_id], lambda v: list(parents) if v == version_id else known(v))
        if cycle:
            raise LineageError(f"version {version_id!r} with parents {list(parents)} cannot be published to lineage "
                               f"{self.directory}: {lineage_records.describe_cycle(cycle)}")

    def add_metrics(self, version_id: str, key: str, values: dict[str, Any]) -> None:
        """Record evaluation results for a version under `key` (e.g. a dataset fingerprint). The file's other
        entries are kept as they are; a damaged file is not overwritten (LineageError), nor is a write that
        fails (read-only or full disk: LineageError) left half done."""
        self.record(version_id)
        path = self.metrics_path(version_id)
        try:
            entries = lineage_metrics.read_entries(path)
        except LineageError as e:
            raise LineageError(f"{e}; it is not overwritten: remove it to cache results again") from None
        entries[key] = values
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lineage_publish.write_json(path, entries)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(f"{path}.tmp{os.getpid()}")  # manifest.write_json's partial file
            raise LineageError(f"{path}: cannot write ({e.strerror or e})") from None

    # -- checking ------------------------------------------------------------------------------

    def verify(self, version_id: str) -> list[str]:
        """Problems found in a version (empty if intact): files changed, missing or added since publishing,
        pickle files or symlinks out of the lineage, a damaged record, parents not in the lineage or a loop
        of parent links through it, and a params content hash that no longer matches."""
        problems = manifest.check(self.path(version_id))
        try:
            record = self.record(version_id)
        except LineageError as e:
            return [*problems, f"{RECORD}: {str(e).split(': ', 1)[-1]}"]
        problems += self.graph_problems(version_id)
        for parent, digest in (record.get("parent_hashes") or {}).items():
            with contextlib.suppress(LineageError):  # a missing or damaged parent is reported above
                if self.exists(parent) and self.record(parent)["params_hash"] != digest:
                    problems.append(f"parent {parent!r} is not the version this one was trained from: it was deleted "
                                    f"and published again (params hash {self.record(parent)['params_hash'][:19]}..., "
                                    f"{digest[:19]}... when this one was published)")
        try:
            digest = params_hash(self.load_params(version_id, check=False))
            if digest != record["params_hash"]:
                problems.append(f"params: content hash {digest[:19]}... differs from the record's "
                                f"{record['params_hash'][:19]}...")
        except Exception as e:  # a damaged checkpoint may fail anywhere inside Orbax/TensorStore
            problems.append(f"params: cannot be read ({type(e).__name__}: {str(e)[:200]})")
        return problems

    def verify_metrics(self, only: list[str] | None = None) -> tuple[list[str], list[str]]:
        """(problems, notes) of the cached evaluation results under metrics/ (see lineage_metrics)."""
        hashes = {}
        for vid in self.ids():
            try:
                hashes[vid] = self.record(vid)["params_hash"]
            except LineageError:
                hashes[vid] = None
        return lineage_metrics.check_metrics_dir(self.directory, hashes, only)


def _check_same_tree(saved: Any, target: Any, what: str) -> None:
    check_tree_matches(saved, target, what, LineageError)


def _local_target(metadata: Any) -> Any:
    """Restore targets on this process's first device, from a checkpoint's metadata. Without a target Orbax
    restores onto the saving run's device layout, which fails on a machine with other devices (a version
    trained on 8 GPUs, exported on a laptop)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata)
