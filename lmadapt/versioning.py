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
import numpy as np

from lmadapt.config import Config, ConfigError, ModelConfig, config_to_dict
from lmadapt.lineage import Lineage, LineageError, params_hash
from lmadapt.model import stack_layers
from lmadapt.tokenizer import Tokenizer

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


def adopt_architecture(mine: ModelConfig, theirs: ModelConfig) -> ModelConfig:
    """`theirs` architecture with `mine` runtime options."""
    return dataclasses.replace(theirs, **{f: getattr(mine, f) for f in RUNTIME_FIELDS})


def resolve_origin(cfg: Config) -> Origin:
    """Resolve `init.*` against `lineage.dir`. Errors are ConfigErrors naming the key."""
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
        cfg = dataclasses.replace(cfg, model=model)

        def load(target: Any) -> Any:
            return lineage.load_params(vid, target, scan_layers=model.scan_layers)

        return Origin(cfg, tokenizer, [vid], load, f"version {vid!r} of {lineage.directory}")
    if cfg.init.from_hf:
        from lmadapt.hf import HFError, import_hf  # only when used: keeps start-up light

        try:
            params, hf_model, tokenizer = import_hf(cfg.init.from_hf)
        except (HFError, OSError) as e:
            raise ConfigError(f"init.from_hf: {e}") from None
        model = adopt_architecture(cfg.model, hf_model)
        cfg = dataclasses.replace(cfg, model=model)
        parents = []
        if lineage is not None:
            parents = [import_root(lineage, cfg.init.from_hf, params, hf_model, tokenizer)]

        def load_hf(target: Any) -> Any:
            tree = stack_layers(params) if model.scan_layers else params
            return jax.device_put(tree, jax.tree.map(lambda t: t.sharding, target))

        return Origin(cfg, tokenizer, parents, load_hf, f"Hugging Face weights in {cfg.init.from_hf}")
    return Origin(cfg, None, [], None, "fresh initialisation")


def import_root(lineage: Lineage, hf_dir: str, params: Any, model: ModelConfig, tokenizer: Tokenizer | None,
                version_id: str | None = None) -> str:
    """Publish imported weights as a root version (or find the one already imported); return its id."""
    from lmadapt.tokenizer import ByteTokenizer

    digest = params_hash(params)
    name = "".join(c if c.isalnum() or c in "_-." else "-" for c in os.path.basename(os.path.abspath(hf_dir)))
    vid = version_id or f"hf-{name[:80]}-{digest[7:15]}"
    if lineage.exists(vid):
        if lineage.record(vid)["params_hash"] != digest:
            raise ConfigError(f"version {vid!r} exists in {lineage.directory} with other weights")
        return vid
    lineage.publish(vid, params, model, tokenizer or ByteTokenizer(), parents=[],
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


def publish_run(cfg: Config, origin: Origin, state: Any, tokenizer: Tokenizer, *, data: dict[str, Any],
                tokens_seen: dict[str, int], metrics: dict[str, Any], strategy: dict[str, Any] | None = None,
                log: Callable[[str], None] = print) -> str | None:
    """Publish a finished run as a new version of `lineage.dir` (once: a restarted finished run does not
    publish again). Returns the version id, or None without a lineage."""
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
    lineage.publish(vid, state.params, cfg.model, tokenizer, parents=origin.parents, config=config_to_dict(cfg),
                    data={**data, "tokens_seen": tokens_seen}, strategy=strategy or {"kind": "full"},
                    steps=int(np.asarray(state.step)), tokens=total, metrics=metrics, note=cfg.version.note,
                    extra={"run_dir": run_dir, "origin": origin.description})
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
