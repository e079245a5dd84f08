"""What an evaluation of versions scores and where its report goes (`eval.py --lineage / --hf`): the versions (of a
lineage, or a Hugging Face directory imported on the fly), the datasets, the report's folder; then the scores.

Everything that can be refused (a missing lineage, an unknown version or dataset, a report folder that cannot be
written) is refused before any version is scored. A lineage that cannot be written (a read-only mount) is only
read: the results go to the report, and `lmadapt.eval.report` warns once that they could not be cached in it.
Messages name `eval.py`'s options (`--lineage`, `--out`, `--datasets`), the only way in.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from lmadapt.config import Config, ConfigError, SourceConfig, TaskConfig
from lmadapt.eval.report import classification_rows, evaluate_versions, write_report
from lmadapt.lineage.metrics import unwritable
from lmadapt.lineage.store import Lineage


@dataclasses.dataclass
class Targets:
    """The versions to evaluate, in order, the lineage that holds them, and the report's folder (writable)."""

    lineage: Lineage
    versions: list[str]
    out_dir: str


def hf_targets(hf_dir: str, lineage_dir: str | None, out: str | None) -> Targets:
    """The Hugging Face directory `hf_dir`, imported as a root version of `lineage_dir` (None: a new temporary
    lineage). The directory and its weights are checked first, so a bad one leaves no temporary lineage."""
    from lmadapt.hf import open_hf  # imported only when used: it pulls in the model
    from lmadapt.lineage.origin import import_root

    ckpt = open_hf(hf_dir)
    tokenizer = ckpt.require_tokenizer()
    params = ckpt.load()  # before the temporary lineage: refused weights (NaN, ...) leave nothing behind
    lineage = Lineage(lineage_dir or tempfile.mkdtemp(prefix="lmadapt-eval-"))
    out_dir = report_dir(out, lineage.directory)
    return Targets(lineage, [import_root(lineage, hf_dir, params, ckpt.config, tokenizer)], out_dir)


def lineage_targets(lineage_dir: str, out: str | None, *, versions: Sequence[str] | None = None,
                    ancestry: str | None = None) -> Targets:
    """Versions of the lineage at `lineage_dir`: `ancestry` and its ancestors, oldest first, else `versions`,
    else all of them. Each record is read now: an unknown id or a damaged record is an error before any work."""
    lineage = Lineage(lineage_dir)
    if not os.path.isdir(lineage.directory):
        raise ConfigError(f"--lineage {lineage_dir}: no such directory")
    out_dir = report_dir(out, lineage.directory)
    chosen = list(reversed(lineage.ancestry(ancestry))) if ancestry else list(versions or lineage.ids())
    for v in chosen:
        lineage.record(v)
    if not chosen:
        raise ConfigError(f"lineage {lineage.directory} has no versions to evaluate")
    return Targets(lineage, chosen, out_dir)


def report_dir(out: str | None, lineage_dir: str) -> str:
    """The report's folder: `out`, else <lineage>/eval; a ConfigError when it cannot be written. Without `out`
    there is nowhere else to write, so the message says to pass --out."""
    target = out or os.path.join(lineage_dir, "eval")
    why = unwritable(target)
    if why and not out:
        raise ConfigError(f"the report would go to {target} (the default --out), but {why}: pass --out DIR to "
                          f"write it elsewhere")
    if why:
        raise ConfigError(f"--out {out}: cannot write the report there: {why}")
    return target


def pick_datasets(sources: Sequence[SourceConfig], names: Sequence[str] | None) -> list[SourceConfig]:
    """The sources named `names`, in that order (None: all of them); an unknown name is a ConfigError."""
    by_name = {s.name: s for s in sources}
    names = list(names) if names else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"--datasets: {unknown} are not sources of the config (it has {sorted(by_name)})")
    return [by_name[n] for n in names]


def evaluate_targets(targets: Targets, datasets: Sequence[SourceConfig], cfg: Config, *, recompute: bool = False,
                     max_examples: int = 200, plot: bool = False, progress: bool = False,
                     tasks: Sequence[TaskConfig] = ()) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Score every version on every dataset and write the report to `targets.out_dir`: language-model datasets
    on the held-out split of `cfg`'s `data.val_fraction` and `data.seed` (with its `train.seq_len`,
    `train.batch_size` and `eval.batches`; results cached in the lineage are reused unless `recompute`),
    classification datasets on up to `max_examples` examples, capability `tasks` (and `cfg.eval.tasks`) on
    their examples, cached in the lineage like the losses. Returns (the report's paths by kind, one
    classification result per (version, classification dataset))."""
    lineage, versions = targets.lineage, targets.versions
    rows = evaluate_versions(lineage, versions, datasets, seq_len=cfg.train.seq_len,
                             batch_size=cfg.train.batch_size, max_batches=cfg.eval.batches,
                             val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, cache_dir=cfg.data.cache_dir,
                             recompute=recompute, progress=progress)
    cls = classification_rows(lineage, versions, datasets, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
                              max_examples=max_examples)
    from lmadapt.eval.task_report import evaluate_tasks, load_tasks

    task_rows = evaluate_tasks(lineage, versions, load_tasks([*cfg.eval.tasks, *tasks]), recompute=recompute,
                               quiet=True)  # evaluate_versions has said what is damaged
    lm_names = [d.name for d in datasets if d.format != "classification"]
    paths = write_report(rows, targets.out_dir, plot=plot, versions=versions, datasets=lm_names, classification=cls,
                         tasks=task_rows)
    return paths, cls
