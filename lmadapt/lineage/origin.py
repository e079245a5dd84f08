"""Where a run starts (fresh, a lineage version, a Hugging Face directory) and the version it publishes.

A run started from a version takes that version's architecture and tokenizer (the config may still
choose runtime options: dtypes, remat, scan, attention), and its published version names the start
as its parent. A run started from Hugging Face weights first imports them as a root version (its id
derived from the content, so importing the same weights twice reuses the version).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmadapt.config import Config, ConfigError, ModelConfig, config_to_dict
from lmadapt.data.tokenizers import Tokenizer, TokenizerError
from lmadapt.lineage.store import Lineage, LineageError, params_hash

# Model options a run may change when it starts from a version: they do not change the function.
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "attention")
PUBLISHED_FILE = "published_version.txt"


@dataclasses.dataclass
class Origin:
    """The resolved start of a run."""

    cfg: Config  # with the architecture of the version it starts from
    tokenizer: Tokenizer | None
    parents: list[str]
    load_params: Callable[[Any], Any] | None  # target ShapeDtypeStructs (with shardings) -> params
    description: str
    lineage: Lineage | None = None

    def load_opt_state(self, target: Any) -> Any:
        """The parent's optimizer state (optimizer.carry_state)."""
        assert self.lineage is not None and self.parents
        try:
            state = self.lineage.load_artifact(self.parents[0], "opt_state", target)
        except LineageError as e:
            raise ConfigError(f"optimizer.carry_state: {e}; publish the parent with lineage.save_opt_state=true "
                              f"and the same optimizer groups") from None
        # The moments (and Adam's bias-correction count) carry over; the learning-rate schedule's own step
        # count does not: this run's schedule starts at its step 0 (schedule.carry offsets it explicitly), as
        # the logged train/lr says. Carried, the parent's count would silently shift the applied schedule.
        return jax.tree.map(lambda x: x._replace(count=jnp.zeros_like(x.count))
                            if isinstance(x, optax.ScaleByScheduleState) else x, state,
                            is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def load_version_params(lineage: Lineage, vid: str, target: Any, scan_layers: bool, stored: str) -> Any:
    """A version's params on `target`'s shardings, cast to `target`'s dtypes: `model.param_dtype` is the run's
    choice (float32 master weights for a version imported from a bfloat16 checkpoint), not the version's."""
    as_stored = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, stored, sharding=t.sharding), target)
    params = lineage.load_params(vid, as_stored, scan_layers=scan_layers)
    return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), params, target)


def adopt_architecture(mine: ModelConfig, theirs: ModelConfig) -> ModelConfig:
    """`theirs` architecture with `mine` runtime options."""
    return dataclasses.replace(theirs, **{f: getattr(mine, f) for f in RUNTIME_FIELDS})


def resolve_origin(cfg: Config, *, write: bool = True) -> Origin:
    """Resolve `init.*` against `lineage.dir`. Errors are ConfigErrors naming the key. With `write=False`
    (a dry run) Hugging Face weights are not published as a root version of the lineage."""
    lineage = Lineage(cfg.lineage.dir) if cfg.lineage.dir else None
    if cfg.version.id and lineage and lineage.exists(cfg.version.id) and not _published_by_this_run(cfg):
        raise ConfigError(f"version.id {cfg.version.id!r} already exists in lineage {lineage.directory}; versions "
                          f"are written once: choose another id")
    if cfg.init.from_version:
        assert lineage is not None  # validated: from_version needs lineage.dir
        vid = cfg.init.from_version
        try:
            model = adopt_architecture(cfg.model, lineage.model_config(vid))
            tokenizer = lineage.tokenizer(vid)
        except LineageError as e:
            raise ConfigError(f"init.from_version: {e}") from None
        _check_seq_len(cfg, model, f"version {vid!r}")
        _check_named_tokenizer(cfg, tokenizer, f"version {vid!r}")
        cfg = dataclasses.replace(cfg, model=model)

        stored = lineage.model_config(vid).param_dtype

        def load(target: Any) -> Any:
            return load_version_params(lineage, vid, target, model.scan_layers, stored)

        return Origin(cfg, tokenizer, [vid], load, f"version {vid!r} of {lineage.directory}", lineage)
    if cfg.init.from_hf:
        return _origin_from_hf(cfg, lineage, write)
    return Origin(cfg, None, [], None, "fresh initialisation", lineage)


def _origin_from_hf(cfg: Config, lineage: Lineage | None, write: bool) -> Origin:
    """Start from a Hugging Face directory: validated up front (nothing is written for a bad one), published as
    a root version when there is a lineage, and streamed onto the run's shardings by `load_params`."""
    from lmadapt.hf import HFError, open_hf  # only when used: keeps start-up light

    hf_dir = cfg.init.from_hf
    try:
        ckpt = open_hf(hf_dir)
        tokenizer, root_tokenizer = _hf_tokenizers(cfg, ckpt)
    except (HFError, OSError) as e:
        raise ConfigError(f"init.from_hf: {e}") from None
    model = adopt_architecture(cfg.model, ckpt.config)  # the run's param_dtype: load casts to it
    _check_seq_len(cfg, model, f"the Hugging Face model in {hf_dir}")
    cfg = dataclasses.replace(cfg, model=model)
    parents = []
    if lineage is not None and write:
        # The root version is the checkpoint as stored (its dtype, per-layer layout): one host copy, then freed.
        parents = [import_root(lineage, hf_dir, ckpt.load(), ckpt.config, root_tokenizer)]

    def load_hf(target: Any) -> Any:
        try:
            return ckpt.load(target)
        except (HFError, OSError) as e:
            raise ConfigError(f"init.from_hf: {e}") from None

    return Origin(cfg, tokenizer, parents, load_hf, f"Hugging Face weights in {hf_dir}", lineage)


def _hf_tokenizers(cfg: Config, ckpt: Any) -> tuple[Tokenizer | None, Tokenizer]:
    """(the run's tokenizer override, the root version's tokenizer). The checkpoint's own tokenizer, unless
    tokenizer.path names one explicitly (that one wins for the run). A checkpoint without a tokenizer needs
    tokenizer.path: the bytes default (or a freshly trained tokenizer) would not match its embeddings."""
    if cfg.tokenizer.path is not None:
        from lmadapt.data.pipeline import resolve_tokenizer

        try:
            explicit = resolve_tokenizer(cfg.tokenizer, {}, None)
        except TokenizerError as e:
            raise ConfigError(f"tokenizer.path: {e}") from None
        return None, ckpt.tokenizer or explicit
    if ckpt.tokenizer is None:
        from lmadapt.hf import HFError

        raise HFError(f"{ckpt.directory}: no usable tokenizer (tokenizer.json, tokenizer.model or tokenizer.bytes); "
                      f"copy the checkpoint's tokenizer files into it or set tokenizer.path")
    return ckpt.tokenizer, ckpt.tokenizer


def _check_named_tokenizer(cfg: Config, tokenizer: Tokenizer, what: str) -> None:
    # A run from a version keeps the version's tokenizer (its embeddings index it); a different one named in
    # the config would otherwise be ignored without a word.
    if cfg.tokenizer.path is None:
        return
    from lmadapt.data.pipeline import resolve_tokenizer

    try:
        named = resolve_tokenizer(cfg.tokenizer, {}, None)
    except TokenizerError as e:
        raise ConfigError(f"tokenizer.path: {e}") from None
    if named.fingerprint != tokenizer.fingerprint:
        raise ConfigError(f"tokenizer.path={cfg.tokenizer.path!r} is not the tokenizer of {what}, which a run from "
                          f"it keeps; remove tokenizer.path (or start a fresh model to use another tokenizer)")


def _check_seq_len(cfg: Config, model: ModelConfig, what: str) -> None:
    # Validation saw the config's own model; a run started from weights takes their architecture.
    if cfg.train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} is over the maximum of {what} "
                          f"(max_seq_len={model.max_seq_len}); set train.seq_len<={model.max_seq_len}")


def import_root(lineage: Lineage, hf_dir: str, params: Any, model: ModelConfig, tokenizer: Tokenizer,
                version_id: str | None = None) -> str:
    """Publish imported weights as a root version (or find the one already imported); return its id."""
    digest = params_hash(params)
    name = "".join(c if c.isalnum() or c in "_-." else "-" for c in os.path.basename(os.path.abspath(hf_dir)))
    vid = version_id or f"hf-{name[:80]}-{digest[7:15]}"
    if lineage.exists(vid):
        if lineage.record(vid)["params_hash"] != digest:
            raise ConfigError(f"version {vid!r} exists in {lineage.directory} with other weights")
        return vid
    lineage.publish(vid, params, model, tokenizer, parents=[],
                    note=f"imported from Hugging Face directory {os.path.abspath(hf_dir)}",
                    extra={"source": {"kind": "hf", "path": os.path.abspath(hf_dir)}})
    return vid


def version_id_for(cfg: Config) -> str:
    """`version.id`, or one generated from the time and a hash of the run config."""
    if cfg.version.id:
        return cfg.version.id
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(repr(config_to_dict(cfg)).encode()).hexdigest()[:6]
    return f"v{stamp}-{digest}"


def publish_run(cfg: Config, origin: Origin, params: Any, steps: int, tokenizer: Tokenizer, *, data: dict[str, Any],
                tokens_seen: dict[str, int], metrics: dict[str, Any], strategy: dict[str, Any] | None = None,
                artifacts: dict[str, Any] | None = None, config_changes: list[dict[str, Any]] | None = None,
                log: Callable[[str], None] = print) -> str | None:
    """Publish a finished run as a new version of `lineage.dir` (once: a restarted finished run does not
    publish again). Returns the version id, or None without a lineage. `config_changes`: what restarts
    changed in the config, and at which step (the record's `config` is the final one)."""
    if not cfg.lineage.dir:
        return None
    run_dir = os.path.abspath(cfg.run.dir)
    marker = os.path.join(run_dir, PUBLISHED_FILE)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            vid = f.read().strip()
        log(f"this run was already published as version {vid!r}")
        return vid
    vid = version_id_for(cfg)
    lineage = Lineage(cfg.lineage.dir)
    total = int(sum(tokens_seen.values()))
    lineage.publish(vid, params, cfg.model, tokenizer, parents=origin.parents, config=config_to_dict(cfg),
                    data={**data, "tokens_seen": tokens_seen}, strategy=strategy or {"kind": "full"},
                    steps=steps, tokens=total, metrics=metrics, note=cfg.version.note, artifacts=artifacts,
                    extra={"run_dir": run_dir, "origin": origin.description, "config_changes": config_changes or []})
    if jax.process_index() == 0:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(vid + "\n")
    log(f"published version {vid!r} to {lineage.directory} (parents: {origin.parents or 'none'})")
    return vid


def _published_by_this_run(cfg: Config) -> bool:
    marker = os.path.join(os.path.abspath(cfg.run.dir), PUBLISHED_FILE)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        return f.read().strip() == cfg.version.id
