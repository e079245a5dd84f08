"""Whether, and from where, a run resumes: the newest checkpoint whose contents check out, trained with
the config the restart asks for, restoring to a finite state. Anything else stops the run before its
first step with one line naming the checkpoint, what is wrong with it and the newest one that is intact.

A checkpoint is *sealed* when its MANIFEST.json (size and sha256 of every file) matches. One committed
without a manifest (a synchronous save whose process died right after Orbax's commit, or a manifest
deleted by hand) is restored only when Orbax's own commit record is whole and every array restores
finite with its saved shape; a byte flipped in such a checkpoint that still decodes to finite numbers
cannot be told from the real thing, which is why sealing is the rule and this the exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lmadapt.checkpoint import Checkpointer, CheckpointError
from lmadapt.config import Config, ConfigError, config_to_dict, section_from_dict
from lmadapt.files import paths
from lmadapt.files.manifest import MANIFEST, summary

# Keys a restart may change without asking: where and how often things are logged, evaluated, saved and
# published, how the job is laid out on devices, and implementation choices that compute the same math.
RUNTIME_KEYS = ("logging", "eval", "checkpoint", "distributed", "mesh", "run.dir", "data.cache_dir", "lineage",
                "version", "train.on_nonfinite", "train.max_nonfinite_in_a_row", "model.attention", "model.remat",
                "model.dtype")  # the compute dtype: params keep param_dtype (a run saved under float32 resumes on auto)
# Keys no flag can change: the checkpoint's tensors or token ids mean something else under another value.
FIXED_KEYS = ("model", "tokenizer")


def resume_point(ckpt: Checkpointer, log: Callable[[str], None]) -> int | None:
    """The newest checkpoint's step once its content check passes (process 0 checks, all processes agree),
    or None for a fresh run. Damaged or unverifiable: CheckpointError naming it and an intact one."""
    foreign = [name for name in sorted(os.listdir(str(ckpt.directory))) if name.isdigit()
               and not os.path.isdir(os.path.join(str(ckpt.directory), name))] if ckpt.directory.is_dir() else []
    if foreign:  # a save of that step would replace it
        where = os.path.join(str(ckpt.directory), foreign[0])
        raise ConfigError(f"{where} {paths.file_problem(where) or 'is a file'}, not a checkpoint directory: a save at "
                          f"step {foreign[0]} would replace it; move it out of {ckpt.directory}")
    latest = ckpt.latest_step()
    if latest is None:
        return None
    problems = checkpoint_problems(ckpt, latest) if jax.process_index() == 0 else []
    if not problems and not manifest_present(ckpt, latest):
        log(f"checkpoint {ckpt.directory / str(latest)} was committed but not sealed (no {MANIFEST}); "
            f"restoring it only if every array comes back finite with its saved shape")
    refused = bool(problems)
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
        detail = summary(problems) if problems else "see the log of process 0"
        raise CheckpointError(f"checkpoint {ckpt.directory / str(latest)} is damaged: {detail}; not resuming from "
                              f"it; {intact_hint(ckpt, latest)}")
    return latest


def checkpoint_problems(ckpt: Checkpointer, step: int) -> list[str]:
    """What keeps checkpoint `step` from being restored (empty if nothing): its manifest's problems, or
    for one without a manifest, what is missing from Orbax's commit record."""
    problems = ckpt.verify(step)
    if len(problems) == 1 and problems[0].startswith(f"{MANIFEST}: missing"):
        return [f"it has no {MANIFEST}, and {p}" for p in commit_record_problems(ckpt.directory / str(step))]
    return problems


def manifest_present(ckpt: Checkpointer, step: int) -> bool:
    return os.path.isfile(os.path.join(str(ckpt.directory / str(step)), MANIFEST))


def commit_record_problems(step_dir: Any) -> list[str]:
    """What is missing from Orbax's record of a committed step (empty if whole): its commit metadata with a
    commit time, and the metadata of both items. An empty or hand-made step directory fails here."""
    path = os.path.join(str(step_dir), "_CHECKPOINT_METADATA")
    if not os.path.lexists(path):
        return ["Orbax's commit record _CHECKPOINT_METADATA is missing"]
    try:
        record = paths.read_json(path, ValueError)
        if not isinstance(record, dict) or not record.get("commit_timestamp_nsecs"):
            return ["Orbax's commit record _CHECKPOINT_METADATA has no commit time"]
    except ValueError as e:
        return [f"Orbax's commit record is unreadable ({e})"]
    missing = [p for p in ("state/_METADATA", "meta/metadata") if not os.path.isfile(os.path.join(str(step_dir), p))]
    return [f"{missing[0]} is missing"] if missing else []


def restore(ckpt: Checkpointer, step: int, abstract_state: Any) -> Any:
    """Restore `step` and refuse it (CheckpointError, before any step runs) unless every floating array is
    finite: a damaged file can decode to NaNs, and training on from them would only save more of them."""
    try:
        state, meta = ckpt.restore(step, abstract_state)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {intact_hint(ckpt, step)}") from None
    bad = first_nonfinite(state)
    what = f"non-finite values in {bad}" if bad is not None else digest_mismatch(state, meta.get("digest"))
    if what:
        raise CheckpointError(f"checkpoint {ckpt.directory / str(step)} restores {what}; not resuming from it; "
                              f"{intact_hint(ckpt, step)}")
    return state


@jax.jit
def _moments(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def digest(state: Any) -> dict[str, list[float]]:
    """{leaf path: [sum, sum of squares]} of a state, computed on its devices (one pass, a few floats back).

    Saved beside each checkpoint, so a restore can tell a state that decodes but is not what was saved: a
    chunk TensorStore cannot find comes back as zeros, not as an error (seen with one flipped byte in an
    unsealed checkpoint: every weight of a tensor zero, the loss exactly ln(vocab))."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    values = jax.device_get(_moments([x for _, x in flat]))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): [float(a), float(b)]
            for (p, _), (a, b) in zip(flat, values, strict=True)}


def digest_mismatch(state: Any, saved: Any) -> str:
    """'' if `state` has the digest `saved` (to float32 rounding of another summation order: a restore
    onto another mesh sums in another order), else the first leaf that differs, in words."""
    if not isinstance(saved, dict):
        return ""  # saved before digests were recorded
    now = digest(state)
    for path, (total, squares) in now.items():
        want = saved.get(path)
        if not (isinstance(want, list) and len(want) == 2):
            return f"a tree without {path} in its saved digest"
        if not np.allclose([total, squares], want, rtol=1e-3, atol=1e-6 * (1.0 + abs(want[1]) ** 0.5)):
            return (f"{path} other than it was saved (sum of squares {squares:.6g}, {want[1]:.6g} when saved: a "
                    f"damaged file decoded without an error)")
    return ""


def first_nonfinite(tree: Any) -> str | None:
    """The path of the first floating leaf of `tree` holding a NaN or Inf, or None."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    floats = [(path, x) for path, x in flat if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jax.device_get(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in floats]))
    for (path, _), ok in zip(floats, finite, strict=True):
        if not ok:
            return jax.tree_util.keystr(path, simple=True, separator="/")
    return None


def intact_hint(ckpt: Checkpointer, step: int) -> str:
    """What to do about checkpoint `step` that cannot be resumed: the newest earlier intact one, if any."""
    earlier = ckpt.newest_intact(below=step)
    if earlier is None:
        return "no earlier checkpoint is intact"
    return (f"checkpoint {earlier} is intact: move {ckpt.directory / str(step)} out of {ckpt.directory} and "
            f"restart to resume from step {earlier}")


def check_allowed(allow: Iterable[str]) -> None:
    """Refuse (ConfigError) an `--allow-config-change` that names keys no resume may change: checked at start,
    before any work."""
    allow = [a.strip() for a in allow if a.strip()]
    fixed = [a for a in allow if _fixed(a)]
    if fixed:
        raise ConfigError(f"--allow-config-change {','.join(fixed)}: {', '.join(FIXED_KEYS)} keys cannot change on "
                          f"resume (the checkpoint's weights and token ids depend on them); start a new run.dir (to go "
                          f"on from this run's weights, publish it and start from it with init.from_version)")


def config_changes(meta: dict[str, Any], step: int, cfg: Config, allow: Iterable[str] = ()
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Compare the config checkpoint `step` was trained with against `cfg`: (every change made on resume so
    far, oldest first; those made now). Only runtime keys, `train.steps` upward and keys in `allow` may
    change; any other change raises ConfigError listing the keys, before anything is written. `meta`: the
    checkpoint's (`Checkpointer.read_meta`)."""
    saved, new = _flat(_normalised(meta.get("config", {}))), _flat(config_to_dict(cfg))
    allow = [a.strip() for a in allow if a.strip()]
    check_allowed(allow)
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k, _MISSING) != new.get(k, _MISSING))
    allowed, refused = [], []
    for key in changed:
        old, now = saved.get(key, _MISSING), new.get(key, _MISSING)
        upward = key == "train.steps" and isinstance(old, int) and isinstance(now, int) and now >= old
        ok = upward or _under(key, RUNTIME_KEYS) or (_under(key, allow) and not _fixed(key))
        (allowed if ok else refused).append({"step": step, "key": key, "from": _show(old), "to": _show(now)})
    if refused:
        shown = "; ".join(f"{c['key']}: {c['from']} -> {c['to']}" for c in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        open_keys = [c["key"] for c in refused if not _fixed(c["key"])]
        way = ("model and tokenizer keys cannot change on resume (the checkpoint's tensors and token ids depend on "
               "them): restore them or use a new run.dir" if len(open_keys) < len(refused) else
               f"restore those values, use a new run.dir, or pass --allow-config-change {','.join(open_keys)}")
        raise ConfigError(f"run.dir {cfg.run.dir}: the config differs from the one checkpoint {step} was trained "
                          f"with: {shown}{more}; resuming would mix two runs: {way}")
    earlier = [c for c in meta.get("config_changes", []) if isinstance(c, dict) and c.get("step") != step]
    return [*earlier, *allowed], allowed


def data_changes(meta: dict[str, Any], step: int, data: dict[str, Any], allow: Iterable[str] = ()) -> None:
    """Refuse (ConfigError) to resume when what a source reads now differs from what checkpoint `step` was
    trained on (a file edited, added to a glob or removed) or the tokenizer changed, unless `allow` names
    `data.sources` (or `data`). `meta`: the checkpoint's (`Checkpointer.read_meta`); checkpoints saved before
    data fingerprints were recorded are not checked."""
    saved = meta.get("data")
    if not isinstance(saved, dict) or _under("data.sources", [a.strip() for a in allow]):
        return
    now = data_fingerprints(data)
    differ = sorted(name for name in saved.keys() | now.keys() if saved.get(name) != now.get(name))
    if differ:
        raise ConfigError(f"run.dir: what data source(s) {', '.join(differ)} read differs from what checkpoint {step} "
                          f"was trained on (a file edited, added or removed, or another tokenizer); resuming would "
                          f"train on other data than the record says. Restore the files, use a new run.dir, or pass "
                          f"--allow-config-change data.sources")


def data_fingerprints(data: dict[str, Any]) -> dict[str, str]:
    """{source: digest of what it read (file sizes and hashes, reading rules), wherever the files lie now}
    plus the tokenizer's, from a pipeline's `describe()`."""
    out = {"(tokenizer)": json.dumps(data.get("tokenizer"), sort_keys=True, default=str)}
    for name, src in data.get("sources", {}).items():
        fp = dict(src.get("fingerprint", {}))
        fp["files"] = [{k: v for k, v in f.items() if k != "path"} for f in fp.get("files", [])]
        out[name] = json.dumps(fp, sort_keys=True, default=str)
    return out


_MISSING = "(not set)"


def _normalised(raw: dict[str, Any]) -> dict[str, Any]:
    """The saved config with today's defaults filled in, so a field added since it was saved is no change."""
    try:
        return config_to_dict(section_from_dict(Config, raw, "the checkpoint's config"))
    except ConfigError:
        return raw


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} or \
            {prefix.rstrip("."): {}}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _fixed(key: str) -> bool:
    """A key no flag may change on resume (model and tokenizer, but for the runtime ones among them)."""
    return _under(key, FIXED_KEYS) and not _under(key, RUNTIME_KEYS)


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _show(value: Any) -> str:
    text = json.dumps(value) if value is not _MISSING else value
    return text if len(text) <= 60 else text[:57] + "..."
