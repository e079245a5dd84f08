"""Evaluate model versions on datasets, or a training run's checkpoint.

    python eval.py --lineage LINEAGE [--versions a,b,c | --ancestry ID] --config configs/X.yaml \
        [--datasets books,python_docs] [--out DIR] [--plot] [--prompt "Once upon" ...] [key.sub=value ...]
    python eval.py --hf HF_DIR --config configs/X.yaml ...      # a Hugging Face directory (imported on the fly)
    python eval.py --run runs/tiny [--step N]                    # held-out loss of a run's checkpoint

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
import math
import os
import sys
import tempfile


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
            print(json.dumps(evaluate_run(cfg, args.step)))
            return 0
        if not (args.lineage or args.hf):
            parser.error("give --run, --lineage or --hf")
        if not args.config:
            parser.error("give --config: its data sources (of every stage) are the datasets")
        return evaluate_versions_cli(args, load_config(args.config, args.overrides, models_from_versions=True))
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def evaluate_versions_cli(args: argparse.Namespace, cfg) -> int:
    """Evaluate versions of a lineage (or an HF directory, imported on the fly) and write the report to --out.
    A lineage that cannot be written (a read-only mount) is only read: the results go to --out, and one
    warning says they could not be cached in it; without --out there is nowhere to write, so that is refused
    before any work."""
    from lmadapt.config import ConfigError
    from lmadapt.eval.report import classification_rows, evaluate_versions, write_report
    from lmadapt.lineage.metrics import unwritable
    from lmadapt.lineage.store import Lineage

    if args.hf:
        from lmadapt.hf import open_hf
        from lmadapt.lineage.origin import import_root

        ckpt = open_hf(args.hf)  # first: a bad directory leaves no temporary lineage
        tokenizer = ckpt.require_tokenizer()
        params = ckpt.load()  # before the temporary lineage: refused weights (NaN, ...) leave nothing behind
        lineage = Lineage(args.lineage or tempfile.mkdtemp(prefix="lmadapt-eval-"))
        out_dir = _writable_out(args.out, lineage.directory, unwritable)
        versions = [import_root(lineage, args.hf, params, ckpt.config, tokenizer)]
    else:
        lineage = Lineage(args.lineage)
        if not os.path.isdir(lineage.directory):
            raise ConfigError(f"--lineage {args.lineage}: no such directory")
        out_dir = _writable_out(args.out, lineage.directory, unwritable)
        if args.ancestry:
            versions = list(reversed(lineage.ancestry(args.ancestry)))
        else:
            versions = args.versions.split(",") if args.versions else lineage.ids()
        for v in versions:
            lineage.record(v)  # a clear error for an unknown id or a damaged record before any work
    if not versions:
        raise ConfigError(f"lineage {lineage.directory} has no versions to evaluate")
    from lmadapt.stages import all_sources

    sources = {s.name: s for s in all_sources(args.config, args.overrides)}
    names = args.datasets.split(",") if args.datasets else list(sources)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise ConfigError(f"--datasets: {unknown} are not sources of the config (it has {sorted(sources)})")
    datasets = [sources[n] for n in names]
    rows = evaluate_versions(lineage, versions, datasets, seq_len=cfg.train.seq_len,
                             batch_size=cfg.train.batch_size, max_batches=cfg.eval.batches,
                             val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, cache_dir=cfg.data.cache_dir,
                             recompute=args.recompute, progress=sys.stderr.isatty())
    cls = classification_rows(lineage, versions, datasets, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
                              max_examples=args.max_examples)
    lm_names = [d.name for d in datasets if d.format != "classification"]
    paths = write_report(rows, out_dir, plot=args.plot, versions=versions, datasets=lm_names, classification=cls)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read().rstrip())
    for c in cls:
        print(f"confusion matrix of {c['version']} on {c['dataset']} (rows: true {c['labels']}):")
        for label, row in zip(c["labels"], c["confusion_matrix"], strict=True):
            print(f"  {label:>12}: {row}")
    for prompt in args.prompt:
        for v in versions:
            print(f"[{v}] {prompt!r} -> {sample(lineage, v, prompt, args.max_new_tokens)!r}")
    print("wrote " + ", ".join(paths.values()))
    return 0


def _writable_out(out: str | None, lineage_dir: str, unwritable) -> str:
    """The report's folder: --out, else <lineage>/eval; refused (before any work) when it cannot be written."""
    from lmadapt.config import ConfigError

    target = out or os.path.join(lineage_dir, "eval")
    why = unwritable(target)
    if why and not out:
        raise ConfigError(f"the report would go to {target} (the default --out), but {why}: pass --out DIR to "
                          f"write it elsewhere")
    if why:
        raise ConfigError(f"--out {out}: cannot write the report there: {why}")
    return target


def sample(lineage, version: str, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by a version (KV-cached decoding)."""
    import dataclasses

    import jax
    import numpy as np

    from lmadapt.generate import generate
    from lmadapt.model import Transformer

    tokenizer = lineage.tokenizer(version)
    model = Transformer(dataclasses.replace(lineage.model_config(version), scan_layers=False))
    params = lineage.load_params(version, scan_layers=False)
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    ids = head + tokenizer.encode([prompt])[0]
    ids = ids[-(model.config.max_seq_len - max_new_tokens):]
    out = generate(model, params, np.asarray([ids], np.int32), max_new_tokens, rng=jax.random.PRNGKey(0),
                   eos_id=tokenizer.eos_id)
    new = [int(t) for t in np.asarray(out)[0, len(ids):] if t != tokenizer.eos_id]
    return tokenizer.decode([new])[0]


def evaluate_run(cfg, step: int | None) -> dict:
    """Restore `step` (or the latest) of the run `cfg.run.dir` and return its held-out loss.

    A reader of a run that may be live: its checkpoints are opened read-only (nothing is created or
    cleaned up, so the run's in-flight saves are untouched), and the checkpoint is checked as a resume
    would check it (manifest, else Orbax's commit record, and finite values) before it is scored."""
    import jax

    from lmadapt.checkpoint import Checkpointer, CheckpointError
    from lmadapt.config import ConfigError
    from lmadapt.lineage.origin import resolve_origin
    from lmadapt.run import resume
    from lmadapt.session import build, run_tokenizer

    directory = os.path.join(os.path.abspath(cfg.run.dir), "checkpoints")
    origin = resolve_origin(cfg, write=False)
    session = build(origin.cfg, tokenizer=run_tokenizer(os.path.abspath(cfg.run.dir)) or origin.tokenizer,
                    teacher_cfg=origin.teacher_cfg)
    for attempt in range(3):  # a live run's keep policy may delete the newest-but-N checkpoint as it is read
        ckpt = Checkpointer(directory, cfg.checkpoint, read_only=True) if os.path.isdir(directory) else None
        steps = ckpt.all_steps() if ckpt else []
        if not steps:
            raise ConfigError(f"run {cfg.run.dir!r} has no checkpoints")
        chosen = max(steps) if step is None else step
        if chosen not in steps:
            raise ConfigError(f"run {cfg.run.dir!r} has no checkpoint at step {chosen}; it has {sorted(steps)}")
        problems = resume.checkpoint_problems(ckpt, chosen)
        try:
            if problems:
                raise CheckpointError(f"checkpoint {ckpt.directory / str(chosen)} is damaged: {problems[0]}; not "
                                      f"scoring it")
            with session.activate():
                losses = session.evaluate(resume.restore(ckpt, chosen, session.abstract_state).params)
            break
        except CheckpointError as e:  # damaged or non-finite, said in one line
            if step is not None or os.path.isdir(ckpt.directory / str(chosen)) or attempt == 2:
                raise ConfigError(str(e)) from None
        finally:
            ckpt.close()
    step = chosen
    if jax.process_index() != 0:
        return {}
    per_source = {k.removesuffix("/loss"): {"loss": v, "perplexity": math.exp(min(v, 50.0))}
                  for k, v in losses.items() if k != "loss"}
    return {"run": cfg.run.dir, "step": step, "eval_batches": cfg.eval.batches, "loss": losses["loss"],
            "perplexity": math.exp(min(losses["loss"], 50.0)), "sources": per_source}


if __name__ == "__main__":
    from lmadapt.allocator import run_entry_point

    run_entry_point(main)
