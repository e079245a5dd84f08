"""Staged runs: train a sequence of versions from one config (the quickstart), then report what each
stage gained and forgot on every dataset involved.

    stages:
      - {name: base, overrides: []}
      - {name: update, overrides: ["init.from_version=base", "data.sources=[...]", "data.replay.fraction=0.2"]}

Each stage is the config with the stage's overrides, then the command line's, applied; it runs in
`<run.dir>/<name>` and publishes version `<name>` into `lineage.dir`. Re-running resumes unfinished
stages and skips published ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from lmadapt.config import Config, ConfigError, SourceConfig, load_config
from lmadapt.lineage.store import Lineage


def run_stages(path: str, overrides: list[str], log: Callable[[str], None] = print, stop: Any = None
               ) -> dict[str, Any] | None:
    """Train every stage of the config at `path`, evaluate all versions on all datasets, write the report.
    `stop`: the caller's StopFlag; a stop signal ends the run after the current stage's checkpoint (None)."""
    from lmadapt.eval.report import evaluate_versions, loss_matrix, write_report
    from lmadapt.trainer import train

    top = load_config(path, overrides)
    if not top.lineage.dir:
        raise ConfigError(f"{path}: a staged run needs lineage.dir (the stages publish versions there)")
    run_root = top.run.dir
    datasets: dict[str, SourceConfig] = {}
    versions, trained_on = [], []
    for stage in top.stages:
        cfg = load_config(path, [*stage.overrides, *overrides, f"version.id={stage.name}",
                                 f"run.dir={os.path.join(run_root, stage.name)}"])
        cfg = dataclasses.replace(cfg, stages=())
        log(f"== stage {stage.name}: {', '.join(s.name for s in cfg.data.sources)}"
            + (f" + {cfg.data.replay.fraction:.0%} replay" if cfg.data.replay.fraction else ""))
        if train(cfg, log=log, stop=stop)["interrupted"]:
            log(f"stopped during stage {stage.name}; run the same command again to resume it")
            return None
        versions.append(stage.name)
        trained_on.append(cfg.data.sources[0].name)
        for src in cfg.data.sources:
            datasets.setdefault(src.name, src)

    lineage = Lineage(top.lineage.dir)
    log("== evaluation on each dataset's held-out split")
    names = list(datasets)
    rows = evaluate_versions(lineage, versions, list(datasets.values()), seq_len=top.train.seq_len,
                             batch_size=top.train.batch_size, max_batches=top.eval.batches,
                             val_fraction=top.data.val_fraction, seed=top.data.seed, cache_dir=top.data.cache_dir,
                             log=log)
    task_rows = _task_rows(lineage, versions, top, log)
    out_dir = os.path.join(run_root, "report")
    paths = write_report(rows, out_dir, plot=True, versions=versions, datasets=names, tasks=task_rows)
    matrix = loss_matrix(rows, versions, names)
    log(change_table(matrix, versions, names))
    summary = continual_summary(matrix, versions, names, trained_on)
    if summary:
        log(summary)
    if task_rows:
        from lmadapt.eval.task_report import task_matrix

        task_names = [t.name for t in top.eval.tasks]
        log(change_table(task_matrix(task_rows, versions, task_names), versions, task_names, higher_is_better=True))
    log(f"report: {paths['markdown']}\nheatmap: {paths['heatmap']}")
    return {"versions": versions, "datasets": names, "loss": matrix, "paths": paths}


def _task_rows(lineage: Lineage, versions: list[str], top: Config, log: Callable[[str], None]) -> list[dict]:
    """Every version on the config's capability tasks (`eval.tasks`), when it has any."""
    if not top.eval.tasks:
        return []
    from lmadapt.eval.task_report import evaluate_tasks, load_tasks

    log("== evaluation on the capability tasks (eval.tasks)")
    return evaluate_tasks(lineage, versions, load_tasks(top.eval.tasks), log=log, quiet=True)  # said once


def change_table(matrix: list[list[float]], versions: list[str], datasets: list[str],
                 higher_is_better: bool = False) -> str:
    """Held-out loss (or, `higher_is_better`, a task score) per column for each version, and the change from the
    first to the last version."""
    head = f"| {'task' if higher_is_better else 'dataset'} | {' | '.join(versions)} | change |"
    lines = [head, "|" + "---|" * (len(versions) + 2)]
    for j, d in enumerate(datasets):
        first, last = matrix[0][j], matrix[-1][j]
        change = last - first
        gain = change if higher_is_better else -change
        verdict = "gained" if gain > 0 else "forgot" if gain < 0 else "same"
        cells = " | ".join(f"{row[j]:.4f}" for row in matrix)
        lines.append(f"| {d} | {cells} | {change:+.4f} ({verdict}) |")
    return "\n".join(lines)


def continual_summary(matrix: list[list[float]], versions: list[str], datasets: list[str],
                      trained_on: list[str]) -> str:
    """BWT and forgetting over the stages (losses: positive forgetting = the loss rose)."""
    if len(versions) < 2 or any(math.isnan(x) for row in matrix for x in row):
        return ""
    from lmadapt.eval.metrics import continual_report

    report = continual_report(matrix, versions, datasets, [datasets.index(t) for t in trained_on],
                              higher_is_better=False)
    d = report.to_dict()
    if d["backward_transfer"] is None:  # every stage trained on the same dataset: nothing to forget
        return ""
    return (f"continual metrics (loss; positive forgetting = the old loss rose): BWT {d['backward_transfer']:+.4f}, "
            f"mean forgetting {d['mean_forgetting']:+.4f}, final average loss {d['average_score']:.4f}")


def all_sources(path: str, overrides: list[str]) -> list[SourceConfig]:
    """Every data source a (possibly staged) config trains on, replay sources included, by name."""
    top = load_config(path, overrides, models_from_versions=True)
    configs = [top] + [load_config(path, [*s.overrides, *overrides], models_from_versions=True) for s in top.stages]
    found: dict[str, SourceConfig] = {}
    for c in configs:
        for src in [*c.data.sources, *c.data.replay.sources]:
            found.setdefault(src.name, src)
    return list(found.values())
