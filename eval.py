"""Evaluate model versions on datasets, or a training run's checkpoint.

    python eval.py --lineage LINEAGE [--versions a,b,c | --ancestry ID] --config configs/X.yaml \
        [--datasets books,python_docs] [--out DIR] [--plot] [--prompt "Once upon" ...] [key.sub=value ...]
    python eval.py --hf HF_DIR --config configs/X.yaml ...      # a Hugging Face directory (imported on the fly)
    python eval.py --run runs/tiny [--step N]                    # held-out loss of a run's checkpoint
    python eval.py --lineage L --config C --tasks configs/eval/tasks.yaml   # + multiple-choice / generation tasks
    python eval.py --lineage L --harness arc_easy,hellaswag [--harness-include DIR]   # lm-evaluation-harness tasks

Datasets are the `data.sources` (and replay sources) of the config, scored on their held-out splits
(the same `data.val_fraction` and `data.seed` as training): loss, perplexity, bits per byte and
next-token accuracy; classification sources (JSONL `format: classification`) by ranking their label
continuations: accuracy, macro precision / recall / F1 and the confusion matrix. Results go to
`--out` as results.json / results.csv / results.md (+ heatmap.png with --plot) and into each
version's metrics in the lineage, keyed by the dataset's fingerprint, so they are not recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the library is imported when a command runs, so that --help is quick
    from lmadapt.config import Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory written by train.py: evaluate its checkpoint")
    parser.add_argument("--step", type=int, default=None, help="with --run: checkpoint step (default: latest)")
    parser.add_argument("--lineage", help="lineage directory holding the versions")
    parser.add_argument("--versions", default=None, help="comma-separated version ids (default: all)")
    parser.add_argument("--ancestry", default=None, help="a version id: evaluate it and its ancestors, oldest first")
    parser.add_argument("--hf", default=None, help="a Hugging Face model directory to evaluate")
    parser.add_argument("--config", default=None, help="run config whose data sources are the datasets")
    parser.add_argument("--datasets", default=None, help="comma-separated source names (default: all)")
    parser.add_argument("--out", default=None, help="output directory (default: <lineage>/eval)")
    parser.add_argument("--plot", action="store_true", help="also write heatmap.png and loss_by_version.png")
    parser.add_argument("--recompute", action="store_true", help="ignore results stored in the lineage")
    parser.add_argument("--prompt", action="append", default=[], help="generate a continuation of this text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=200, help="classification examples per dataset")
    parser.add_argument("--tasks", default=None, metavar="SUITE.yaml",
                        help="capability tasks (multiple choice, generation) to score besides the config's eval.tasks, "
                             "e.g. configs/eval/tasks.yaml")
    parser.add_argument("--harness", default=None, metavar="TASKS",
                        help="lm-evaluation-harness tasks (comma-separated) to run on each version (pip install -e "
                             "'.[eval]'); --harness-include DIR adds a folder of task YAMLs")
    parser.add_argument("--harness-include", default=None, metavar="DIR")
    parser.add_argument("--harness-limit", type=int, default=None, metavar="N", help="examples per harness task")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.batches=8")
    args = parser.parse_args(argv)

    from lmadapt.config import ConfigError, load_config
    from lmadapt.data import DataError
    from lmadapt.data.tokenizers import TokenizerError
    from lmadapt.lineage.store import LineageError

    errors: tuple[type[Exception], ...] = (ConfigError, DataError, LineageError, TokenizerError)
    if args.hf:
        from lmadapt.hf import HFError  # imported only when used: it pulls in the model

        errors += (HFError,)
    try:
        if args.run:
            # The directory given, wherever the run was when it wrote its config (it may have been moved).
            cfg = load_config(os.path.join(args.run, "config.yaml"), [f"run.dir={args.run}", *args.overrides])
            from lmadapt.run.scoring import evaluate_run  # after the config: a bad one is refused without the model

            print(json.dumps(evaluate_run(cfg, args.step)))
            return 0
        if not (args.lineage or args.hf):
            parser.error("give --run, --lineage or --hf")
        if args.harness:
            from lmadapt.eval.harness import HarnessError  # only here: it imports JAX

            try:
                return harness_cli(args)
            except HarnessError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        if not args.config:
            parser.error("give --config: its data sources (of every stage) are the datasets")
        return evaluate_versions_cli(args, load_config(args.config, args.overrides, models_from_versions=True))
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def evaluate_versions_cli(args: argparse.Namespace, cfg: Config) -> int:
    """Evaluate versions of a lineage (or an HF directory, imported on the fly), write the report to --out and
    print it, with the confusion matrices and the --prompt samples. A lineage that cannot be written (a read-only
    mount) is only read: the results go to --out, and one warning says they could not be cached in it; without
    --out there is nowhere to write, so that is refused before any work."""
    from lmadapt.eval.samples import sample
    from lmadapt.eval.targets import evaluate_targets, hf_targets, lineage_targets, pick_datasets
    from lmadapt.stages import all_sources

    if args.hf:
        targets = hf_targets(args.hf, args.lineage, args.out)
    else:
        targets = lineage_targets(args.lineage, args.out, versions=_names(args.versions), ancestry=args.ancestry)
    from lmadapt.eval.task_report import read_suite

    tasks = read_suite(args.tasks) if args.tasks else ()
    datasets = pick_datasets(all_sources(args.config, args.overrides), _names(args.datasets))
    paths, cls = evaluate_targets(targets, datasets, cfg, recompute=args.recompute, max_examples=args.max_examples,
                                  plot=args.plot, progress=sys.stderr.isatty(), tasks=tasks)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read().rstrip())
    for c in cls:
        print(f"confusion matrix of {c['version']} on {c['dataset']} (rows: true {c['labels']}):")
        for label, row in zip(c["labels"], c["confusion_matrix"], strict=True):
            print(f"  {label:>12}: {row}")
    for prompt in args.prompt:
        for v in targets.versions:
            print(f"[{v}] {prompt!r} -> {sample(targets.lineage, v, prompt, args.max_new_tokens)!r}")
    print("wrote " + ", ".join(paths.values()))
    return 0


def harness_cli(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on each version of --lineage, printed as JSON, kept in each version's metrics
    under harness:<task> (stamped with the params hash) and written to --out/harness.json."""
    from lmadapt.config import ConfigError
    from lmadapt.eval.harness import run_harness
    from lmadapt.eval.targets import lineage_targets

    if args.hf:
        raise ConfigError("--harness runs on lineage versions: import the Hugging Face directory first "
                          "(tools/lineage.py import-hf) and pass --lineage")
    targets = lineage_targets(args.lineage, args.out, versions=_names(args.versions), ancestry=args.ancestry)
    results = {}
    for vid in targets.versions:
        results[vid] = run_harness(args.lineage, vid, _names(args.harness), include_path=args.harness_include,
                                   limit=args.harness_limit)
        stamp = {"params_hash": targets.lineage.record(vid)["params_hash"], "limit": args.harness_limit}
        for task, values in results[vid].items():
            targets.lineage.add_metrics(vid, f"harness:{task}", {**values, **stamp})
    os.makedirs(targets.out_dir, exist_ok=True)
    with open(os.path.join(targets.out_dir, "harness.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    return 0


def _names(option: str | None) -> list[str] | None:
    """A comma-separated option as a list; None when it was not given (or empty)."""
    return option.split(",") if option else None


if __name__ == "__main__":
    from lmadapt.allocator import run_entry_point

    run_entry_point(main)
