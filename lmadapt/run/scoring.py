"""Scoring a training run's checkpoint: the held-out loss of `eval.py --run`.

A reader of a run that may be live: its checkpoints are opened read-only (nothing is created or cleaned up,
so the run's in-flight saves are untouched), and a checkpoint is checked as a resume would check it
(manifest, else Orbax's commit record, and finite values) before it is scored.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

from lmadapt.checkpoint import Checkpointer, CheckpointError
from lmadapt.config import Config, ConfigError
from lmadapt.lineage.origin import resolve_origin
from lmadapt.run import resume
from lmadapt.session import Session, build, run_tokenizer


def evaluate_run(cfg: Config, step: int | None) -> dict[str, Any]:
    """Restore `step` (or the latest) of the run `cfg.run.dir` and return its held-out loss: {"run", "step",
    "eval_batches", "loss", "perplexity", "sources": {name: {"loss", "perplexity"}}} on process 0, {} on the
    others. A run without that checkpoint, or whose checkpoint is damaged, is a ConfigError in one line."""
    origin = resolve_origin(cfg, write=False)
    session = build(origin.cfg, tokenizer=run_tokenizer(os.path.abspath(cfg.run.dir)) or origin.tokenizer,
                    origin=origin)
    step, losses = _score_checkpoint(session, cfg, step)
    if jax.process_index() != 0:
        return {}
    per_source = {k.removesuffix("/loss"): {"loss": v, "perplexity": _perplexity(v)}
                  for k, v in losses.items() if k != "loss"}
    return {"run": cfg.run.dir, "step": step, "eval_batches": cfg.eval.batches, "loss": losses["loss"],
            "perplexity": _perplexity(losses["loss"]), "sources": per_source}


def _score_checkpoint(session: Session, cfg: Config, step: int | None) -> tuple[int, dict[str, float]]:
    """(the step scored, `session.evaluate`'s losses) for checkpoint `step` (None: the latest) of the run."""
    directory = os.path.join(os.path.abspath(cfg.run.dir), "checkpoints")
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
                return chosen, session.evaluate(resume.restore(ckpt, chosen, session.abstract_state).params)
        except CheckpointError as e:  # damaged or non-finite, said in one line
            # Only the latest checkpoint, deleted under us by the live run, is worth another try.
            if step is not None or os.path.isdir(ckpt.directory / str(chosen)) or attempt == 2:
                raise ConfigError(str(e)) from None
        finally:
            ckpt.close()
    raise AssertionError("unreachable: the last attempt returns or raises")


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged run's loss would overflow exp
