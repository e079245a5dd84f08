"""Evaluate a training run's checkpoint: `python eval.py --run runs/tiny [--step N] [key.sub=value ...]`.

Prints one JSON line with the held-out loss and perplexity over `eval.batches` batches of the run's
validation split (the same batches the training loop evaluates on).
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
    from lmadapt.trainer import build

    session = build(cfg)
    ckpt = Checkpointer(os.path.join(os.path.abspath(cfg.run.dir), "checkpoints"), cfg.checkpoint)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"run {cfg.run.dir!r} has no checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"run {cfg.run.dir!r} has no checkpoint at step {step}; it has {sorted(steps)}")
    with session.activate():
        state, _ = ckpt.restore(step, session.abstract_state)
        loss = session.evaluate(state.params)
    ckpt.close()
    if jax.process_index() != 0:
        return {}
    return {"run": cfg.run.dir, "step": step, "eval_batches": cfg.eval.batches, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0))}


if __name__ == "__main__":
    sys.exit(main())
