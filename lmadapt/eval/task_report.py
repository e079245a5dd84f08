"""Scoring lineage versions on capability tasks, cached in the lineage, and the version x task matrix.

Each (version, task) result is stored in the version's metrics under `task:<name>:<fingerprint>` (the task's
files and settings), stamped with the params hash and tokenizer, so a later evaluation of the same params on the
same task reuses it. The matrix's column for a task is its main metric (`acc` for multiple choice, `exact_match`
for generation; higher is better); beside the loss columns (lower is better) every summary states its direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lmadapt.config import ConfigError, TaskConfig
from lmadapt.eval.cache import ResultCache
from lmadapt.eval.task_scoring import score_generate, score_multiple_choice
from lmadapt.eval.tasks import Task, TaskError, load_task
from lmadapt.lineage import metrics as lineage_metrics
from lmadapt.lineage.store import Lineage
from lmadapt.model import per_layer

MAIN_METRIC = {"multiple_choice": "acc", "generate": "exact_match"}
TASK_METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_bytes"), "generate": ("exact_match", "f1")}
TASK_COLUMNS = ["version", "task", "format", "examples", "acc", "acc_norm", "acc_bytes", "exact_match", "f1"]


def read_suite(path: str) -> tuple[TaskConfig, ...]:
    """The `eval.tasks` of a config file (a suite: `eval: {tasks: [{name, path, format, ...}]}`), checked as every
    config is; a task path is relative to the directory the command runs in, as data source paths are."""
    from lmadapt.config import load_config

    tasks = load_config(path).eval.tasks
    if not tasks:
        raise ConfigError(f"{path}: no tasks under eval.tasks")
    return tasks


def load_tasks(configs: Sequence[TaskConfig], where: str = "eval.tasks") -> list[tuple[TaskConfig, Task]]:
    """Every configured task read and checked up front: a bad file is a ConfigError naming it (file:line)."""
    out = []
    for i, c in enumerate(configs):
        try:
            out.append((c, load_task(c.name, c.path, c.format, num_fewshot=c.num_fewshot,
                                     fewshot_path=c.fewshot_path, seed=c.seed)))
        except TaskError as e:
            raise ConfigError(f"{where}.{i} ({c.name}): {e}") from None
    return out


def score_task(params: Any, model_cfg: Any, tokenizer: Any, cfg: TaskConfig, task: Task) -> dict[str, Any]:
    """One task's scores for params (per-layer layout) of `model_cfg`."""
    if task.format == "generate":
        return score_generate(params, model_cfg, tokenizer, task, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop,
                              max_examples=cfg.max_examples)
    return score_multiple_choice(params, model_cfg, tokenizer, task, max_examples=cfg.max_examples)


def evaluate_tasks(lineage: Lineage, versions: Sequence[str], tasks: Sequence[tuple[TaskConfig, Task]], *,
                   recompute: bool = False, cache: bool = True, log: Callable[[str], None] = print,
                   warn: Callable[[str], None] = lineage_metrics.warn, quiet: bool = False) -> list[dict[str, Any]]:
    """One row per (version, task), reusing results the lineage holds for the same params, tokenizer and task.
    `quiet`: a damaged metrics file was already reported (by the loss evaluation just before): not again."""
    rows: list[dict[str, Any]] = []
    if not tasks:
        return rows
    cacher = ResultCache(lineage, warn, cache)
    for vid in versions:
        model_cfg, tokenizer, params = lineage.model_config(vid), lineage.tokenizer(vid), None
        stored = lineage.metrics(vid, quiet=quiet)
        want = {"params_hash": lineage.record(vid)["params_hash"], "tokenizer": tokenizer.fingerprint}
        for cfg, task in tasks:
            key = f"task:{task.name}:{task.fingerprint}"
            settings = {**want, "max_examples": cfg.max_examples,
                        **({"max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop)}
                           if task.format == "generate" else {})}
            entry = stored.get(key)
            if not recompute and isinstance(entry, dict) and all(entry.get(k) == v for k, v in settings.items()) \
                    and isinstance(entry.get(MAIN_METRIC[task.format]), float):
                rows.append({"version": vid, **entry})
                continue
            params = params if params is not None else lineage.load_params(vid, scan_layers=False)
            scores = {**score_task(params, per_layer(model_cfg), tokenizer, cfg, task), **settings}
            scores.pop("generations", None)  # the report keeps the numbers; samples are eval.py --prompt's
            scores.pop("predictions", None)
            cacher.add(vid, key, scores)
            rows.append({"version": vid, **scores})
            metric = MAIN_METRIC[task.format]
            log(f"  {vid} on task {task.name}: {metric} {scores[metric]:.4f}")
    return rows


def task_matrix(rows: Sequence[dict[str, Any]], versions: Sequence[str], tasks: Sequence[str]) -> list[list[float]]:
    """R[version][task] = the task's main metric (NaN where not scored)."""
    def cell(v: str, t: str) -> float:
        for r in rows:
            if r["version"] == v and r["task"] == t:
                return float(r[MAIN_METRIC[r["format"]]])
        return float("nan")

    return [[cell(v, t) for t in tasks] for v in versions]


def capability_summary(matrix: list[list[float]], versions: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    """What the versions gained and forgot on each task against the first one (higher is better): every task
    counts as learned by the first version, so BWT is final - first and forgetting best earlier - final."""
    from lmadapt.eval.metrics import continual_report

    per_task = {}
    for j, t in enumerate(tasks):
        column = [[row[j]] for row in matrix]
        rep = continual_report(column, versions, [t], [0] + [None] * (len(versions) - 1), higher_is_better=True)
        per_task[t] = {"first": column[0][0], "final": column[-1][0], "change": rep.backward_transfer,
                       "forgetting": rep.forgetting.get(t)}
    changes = [p["change"] for p in per_task.values() if p["change"] is not None]
    forgets = [p["forgetting"] for p in per_task.values() if p["forgetting"] is not None]
    return {"higher_is_better": True, "tasks": per_task,
            "mean_change": sum(changes) / len(changes) if changes else None,
            "mean_forgetting": sum(forgets) / len(forgets) if forgets else None,
            "final_average": sum(r for r in matrix[-1]) / len(tasks) if tasks else None}
