"""Evaluate a training run's checkpoint: `python eval.py --run runs/tiny [--step N] [key.sub=value ...]`.

Prints one JSON line with the held-out loss and perplexity, overall and per source, over the first
`eval.batches` batches of each source's validation split (the batches the training loop evaluates on).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory written by train.py (holds config.yaml)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.batches=8 mesh.data=1")
    args = parser.parse_args(argv)

    from lmadapt.config import ConfigError, load_config

    try:
        config_path = os.path.join(args.run, "config.yaml")
        cfg = load_config(config_path, args.overrides)
        result = evaluate_run(cfg, args.step)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def evaluate_run(cfg, step: int | None) -> dict:
    """Restore `step` (or the latest) of the run `cfg.run.dir` and return its held-out loss."""
    import jax

    from lmadapt.checkpoint import Checkpointer
    from lmadapt.config import ConfigError
    from lmadapt.trainer import build, run_tokenizer

    session = build(cfg, tokenizer=run_tokenizer(os.path.abspath(cfg.run.dir)))
    ckpt = Checkpointer(os.path.join(os.path.abspath(cfg.run.dir), "checkpoints"), cfg.checkpoint)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"run {cfg.run.dir!r} has no checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"run {cfg.run.dir!r} has no checkpoint at step {step}; it has {sorted(steps)}")
    with session.activate():
        state, _ = ckpt.restore(step, session.abstract_state)
        losses = session.evaluate(state.params)
    ckpt.close()
    if jax.process_index() != 0:
        return {}
    per_source = {k.removesuffix("/loss"): {"loss": v, "perplexity": math.exp(min(v, 50.0))}
                  for k, v in losses.items() if k != "loss"}
    return {"run": cfg.run.dir, "step": step, "eval_batches": cfg.eval.batches, "loss": losses["loss"],
            "perplexity": math.exp(min(losses["loss"], 50.0)), "sources": per_source}


if __name__ == "__main__":
    sys.exit(main())
