"""Evaluating a set of model versions on a set of datasets, as tables, a heatmap and lineage metrics.

Used by `eval.py` and by a staged run (the quickstart): every version is scored on every dataset's
held-out split; results are written as JSON, CSV and Markdown, added to each version's metrics in the
lineage (keyed by dataset fingerprint and stamped with the params hash, so a later evaluation of the same
params reuses them and one of other params under a reused id does not), and drawn as a heatmap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from lmadapt.config import ConfigError, SourceConfig
from lmadapt.data.sources import read_source
from lmadapt.eval.cache import ResultCache
from lmadapt.eval.scoring import classify, dataset_key, lm_scores
from lmadapt.lineage import metrics as lineage_metrics
from lmadapt.lineage.store import Lineage
from lmadapt.model import per_layer

LM_COLUMNS = ["version", "dataset", "loss", "perplexity", "bits_per_byte", "token_accuracy", "tokens"]


def evaluate_versions(lineage: Lineage, versions: Sequence[str], datasets: Sequence[SourceConfig], *,
                      seq_len: int, batch_size: int, max_batches: int, val_fraction: float, seed: int,
                      cache_dir: str | None, recompute: bool = False, progress: bool = False,
                      log: Callable[[str], None] = print, warn: Callable[[str], None] = lineage_metrics.warn,
                      cache: bool = True) -> list[dict[str, Any]]:
    """One row per (version, dataset). A result stored in the lineage is reused only when it was computed
    from this version's params (params hash), on this split of these files (the key: dataset fingerprint,
    tokenizer, val_fraction, seed), with this seq_len, batch size and number of batches. New results are
    cached in the lineage unless `cache` is False; when that fails (a read-only or full disk, a damaged
    metrics file) one warning says so and the rows are still returned."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    keys: dict[tuple[str, str], str] = {}  # (dataset, tokenizer fingerprint) -> key: read each source once
    cacher = ResultCache(lineage, warn, cache)
    bar = tqdm(total=len(versions) * sum(s.format != "classification" for s in datasets), unit="eval",
               disable=not progress, leave=False)
    for vid in versions:
        model_cfg, tokenizer = lineage.model_config(vid), lineage.tokenizer(vid)
        if seq_len > model_cfg.max_seq_len:  # the config's own model was not checked: versions bring theirs
            raise ConfigError(f"train.seq_len={seq_len} is over the max_seq_len={model_cfg.max_seq_len} of version "
                              f"{vid!r}; set train.seq_len<={model_cfg.max_seq_len}")
        params = None
        stored = lineage.metrics(vid)
        want = {"params_hash": lineage.record(vid)["params_hash"], "tokenizer": tokenizer.fingerprint,
                "seq_len": seq_len, "batch_size": batch_size, "max_batches": max_batches}
        for src in datasets:
            if src.format == "classification":
                continue
            bar.update(1)
            if (src.name, tokenizer.fingerprint) not in keys:
                keys[src.name, tokenizer.fingerprint] = dataset_key(src, read_source(src).fingerprint, tokenizer,
                                                                    val_fraction, seed)
            key = keys[src.name, tokenizer.fingerprint]
            if not recompute and _reusable(stored.get(key), want):
                rows.append({"version": vid, **stored[key]})
                continue
            if params is None:
                params = lineage.load_params(vid, scan_layers=False)
            scores = lm_scores(params, per_layer(model_cfg), tokenizer, src, seq_len=seq_len, batch_size=batch_size,
                               max_batches=max_batches, val_fraction=val_fraction, seed=seed, cache_dir=cache_dir)
            scores.update(want)
            cacher.add(vid, scores["key"], scores)
            rows.append({"version": vid, **scores})
            log(f"  {vid} on {src.name}: loss {scores['loss']:.4f}, {scores['bits_per_byte']:.3f} bits/byte")
    bar.close()
    return rows


def _reusable(entry: Any, want: dict[str, Any]) -> bool:
    """Whether a stored entry was computed as `want` says and holds the scores a row needs."""
    return (isinstance(entry, dict) and all(entry.get(k) == v for k, v in want.items())
            and all(isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
                    for k in ("loss", "perplexity", "bits_per_byte", "token_accuracy", "tokens"))
            and isinstance(entry.get("dataset"), str))


def classification_rows(lineage: Lineage, versions: Sequence[str], datasets: Sequence[SourceConfig], *,
                        val_fraction: float, seed: int, max_examples: int) -> list[dict[str, Any]]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix per (version, classification dataset)."""
    from lmadapt.eval.classification import classification_report

    rows = []
    for vid in versions:
        params = None
        for src in datasets:
            if src.format != "classification":
                continue
            params = params if params is not None else lineage.load_params(vid, scan_layers=False)
            out = classify(params, per_layer(lineage.model_config(vid)), lineage.tokenizer(vid), src,
                           max_examples=max_examples, val_fraction=val_fraction, seed=seed)
            report = classification_report(out["y_true"], out["y_pred"], out["labels"])
            rows.append({"version": vid, "dataset": src.name, **report})
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str, *, plot: bool, versions: Sequence[str],
                 datasets: Sequence[str], classification: list[dict[str, Any]] | None = None,
                 tasks: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """results.json / results.csv / results.md (+ heatmap.png, loss_by_version.png, and with tasks
    task_heatmap.png, tasks_by_version.png); returns their paths."""
    from lmadapt.eval.classification import csv_text, markdown_table
    from lmadapt.eval.task_report import TASK_COLUMNS, capability_summary, task_matrix

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv"),
             "markdown": os.path.join(out_dir, "results.md")}
    task_names = list(dict.fromkeys(r["task"] for r in tasks or []))
    task_R = task_matrix(tasks or [], versions, task_names)
    summary = capability_summary(task_R, versions, task_names) if task_names else None
    _write(paths["json"], json.dumps({"lm": rows, "classification": classification or [], "tasks": tasks or [],
                                      "task_matrix": {"versions": list(versions), "tasks": task_names,
                                                      "R": task_R, "summary": summary}}, indent=1))
    _write(paths["csv"], csv_text(rows, LM_COLUMNS))
    md = markdown_table(rows, LM_COLUMNS)
    for c in classification or []:
        md += (f"\n\n{c['version']} on {c['dataset']}: accuracy {c['accuracy']:.4f}, macro F1 "
               f"{c['macro_f1']:.4f}")
    if task_names:
        md += "\n\nTasks (higher is better):\n\n" + markdown_table(tasks or [], TASK_COLUMNS)
        md += "\n\n" + "\n".join(
            f"{t}: {p['first']:.4f} -> {p['final']:.4f} ({p['change']:+.4f}; forgetting {p['forgetting']:+.4f})"
            if p["change"] is not None else f"{t}: {p['final']:.4f}" for t, p in summary["tasks"].items())
    _write(paths["markdown"], md + "\n")
    if plot and rows:
        from lmadapt.eval.plots import heatmap, loss_across_versions

        matrix = [[_loss(rows, v, d) for d in datasets] for v in versions]
        paths["heatmap"] = heatmap(matrix, list(versions), list(datasets), os.path.join(out_dir, "heatmap.png"),
                                   title="held-out loss (row: version, column: dataset)")
        paths["loss_by_version"] = loss_across_versions(
            {d: [_loss(rows, v, d) for v in versions] for d in datasets}, list(versions),
            os.path.join(out_dir, "loss_by_version.png"))
    if plot and task_names:
        from lmadapt.eval.plots import heatmap, loss_across_versions

        paths["task_heatmap"] = heatmap(task_R, list(versions), task_names, os.path.join(out_dir, "task_heatmap.png"),
                                        title="task score (row: version, column: task; higher is better)")
        paths["tasks_by_version"] = loss_across_versions(
            {t: [row[j] for row in task_R] for j, t in enumerate(task_names)}, list(versions),
            os.path.join(out_dir, "tasks_by_version.png"), ylabel="task score (acc / exact match)")
    return paths


def loss_matrix(rows: list[dict[str, Any]], versions: Sequence[str], datasets: Sequence[str]) -> list[list[float]]:
    return [[_loss(rows, v, d) for d in datasets] for v in versions]


def _loss(rows: list[dict[str, Any]], version: str, dataset: str) -> float:
    for r in rows:
        if r["version"] == version and r["dataset"] == dataset:
            return float(r["loss"])
    return float("nan")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
