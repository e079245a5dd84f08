"""The training loop: takes the run directory (one job at a time), builds the session (session.py), picks
and checks the resume point (resume.py), then runs, logs, evaluates, checkpoints and publishes. All side
effects of training (files, signals, progress bars) live here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import yaml
from tqdm import tqdm

from lmadapt import precision, sharding
from lmadapt.checkpoint import Checkpointer
from lmadapt.config import Config, ConfigError, config_to_dict
from lmadapt.continual import average
from lmadapt.continual.budget import Budget
from lmadapt.files import locks
from lmadapt.lineage.origin import Origin, publish_run, resolve_origin
from lmadapt.model import count_params
from lmadapt.run import guards, resume
from lmadapt.run.logs import MetricsLogger
from lmadapt.run.stopflag import StopFlag
from lmadapt.session import Session, build, run_tokenizer
from lmadapt.train_step import TrainState, final_params


def _publish(session: Session, origin: Origin, state: TrainState, evals: dict[str, float],
             log: Callable[[str], None], config_changes: list[dict[str, Any]],
             budget: dict[str, Any] | None = None) -> str | None:
    """Publish the finished run: its params (averaged when continual.average asks) and the strategy's
    artifacts (LoRA adapters, a Fisher), the optimizer state when asked, and the record."""
    cfg = session.cfg
    if not cfg.lineage.dir:
        return None
    params, artifacts = session.strategy.publishable(final_params(state), session, origin)
    avg = average.of(session.strategy)
    if avg is not None and avg.changes_params:  # the record's metrics are of the params the version holds
        evals = session.evaluate_published(params)
    if cfg.lineage.save_opt_state:
        artifacts["opt_state"] = state.opt_state
    return publish_run(cfg, origin, params, int(state.step), session.data.tokenizer, data=session.data.describe(),
                       tokens_seen=session.data.tokens_seen(int(state.step)),
                       metrics={f"eval/{k}": v for k, v in evals.items()},
                       strategy={**session.strategy.describe(cfg, list(session.groups.table)),
                                 **({"forgetting_budget": budget} if budget else {})}, artifacts=artifacts,
                       config_changes=config_changes, log=log)


RUN_LOCK = "train.lock"  # in run.dir: held (flock) by the one job writing it


def train(cfg: Config, *, on_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
          devices: list[jax.Device] | None = None, stop: StopFlag | None = None,
          allow_config_change: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) the job described by `cfg`; return a summary (final step, losses, eval loss).

    `on_step(step)` is called on the host after each step is dispatched (tests use it to inject faults);
    `devices` restricts the mesh to some devices (default: all global devices); `stop`: a StopFlag already
    raised by the caller (train.py raises it before importing JAX); `allow_config_change`: config keys a
    resume may change beyond the runtime ones (see resume.config_changes).
    """
    resume.check_allowed(allow_config_change)
    sharding.maybe_initialize_distributed(cfg.distributed)  # before anything touches a device
    run_dir = os.path.abspath(cfg.run.dir)
    guards.check_writable(run_dir, "run.dir")
    if cfg.lineage.dir:
        guards.check_writable(os.path.abspath(os.path.expanduser(cfg.lineage.dir)), "lineage.dir")
    existed = guards.nearest_existing(run_dir)  # what a refused start leaves: folders above it are ours
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, RUN_LOCK)
    # One writer per run directory: a second job would interleave metrics and checkpoints silently.
    with locks.exclusive_for_job(lock, f"run.dir {run_dir}"), \
            contextlib.nullcontext(stop) if stop is not None else StopFlag() as stop:
        try:
            started = _start(cfg, run_dir, devices, log, stop, allow_config_change)
        except BaseException:
            if existed != run_dir and jax.process_index() == 0 and os.listdir(run_dir) == [RUN_LOCK]:
                # Refused before writing anything: leave no run directory behind. (A job that opened the
                # lock meanwhile was refused by it; one that comes later finds no directory and starts anew.)
                os.remove(lock)
                folder = run_dir
                with contextlib.suppress(OSError):
                    while folder != existed:
                        os.rmdir(folder)
                        folder = os.path.dirname(folder)
            raise
        if started is None:
            log(f"stopping on {stop.name} during start-up, before the first step; nothing was trained or saved")
            return {"step": None, "eval_loss": None, "state": None, "interrupted": True, "version": None}
        return _run(started, on_step, log, stop)


@dataclasses.dataclass
class _Started:
    """A run ready for its first step: built, its resume point chosen and checked, its state in memory."""

    cfg: Config
    origin: Origin
    session: Session
    ckpt: Checkpointer
    state: TrainState
    meta: dict[str, Any]  # saved beside every checkpoint: the config, and config changes made on resume
    budget: Budget | None = None  # continual.forgetting_budget: its baseline and decisions (also in `meta`)


def _start(cfg: Config, run_dir: str, devices: list[jax.Device] | None, log: Callable[[str], None], stop: StopFlag,
           allow: tuple[str, ...]) -> _Started | None:
    """Build the session, pick and check the resume point, write the run's config and tokenizer, and make
    the first state. None if a stop signal came in meanwhile (checked between the slow parts)."""
    if stop.signal:
        return None
    origin = resolve_origin(cfg)
    session = build(origin.cfg, devices, log=log, tokenizer=run_tokenizer(run_dir) or origin.tokenizer, origin=origin)
    cfg = session.cfg
    guards.check_room(run_dir, session.abstract_state, "run.dir", "one checkpoint of this state")
    if cfg.lineage.dir:
        guards.check_room(os.path.abspath(os.path.expanduser(cfg.lineage.dir)), session.abstract_state.params,
                          "lineage.dir", "one version of these params")
    if stop.signal:
        return None
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.checkpoint)
    with session.activate(), guards.exit_on_lost_peer():
        latest = resume.resume_point(ckpt, log)
        changes, new, saved = [], [], None
        if latest is not None:
            saved = ckpt.read_meta(latest)
            changes, new = resume.config_changes(saved, latest, cfg, allow)
            resume.data_changes(saved, latest, session.data.describe(), allow)
        # A resumed budget trains on the phases its checkpoint recorded: batch s is a function of them.
        budget, phases = Budget.of(cfg, saved, latest)
        if phases:
            session.data.set_phases(phases)
        state = _first_state(cfg, session, origin, ckpt, latest, log)
        if jax.process_index() == 0:  # only now: a refused resume leaves the run's record as it was
            with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
            session.data.tokenizer.save(run_dir)  # the run is self-contained: its tokenizer travels with it
        for c in new:
            log(f"config change on resume at step {c['step']}: {c['key']} {c['from']} -> {c['to']}")
    if stop.signal:
        ckpt.close()
        return None
    meta = {"config": config_to_dict(cfg), "config_changes": changes,
            "data": resume.data_fingerprints(session.data.describe())}
    if budget is not None:
        meta["budget"] = budget.state(session.data.phases)
    return _Started(cfg, origin, session, ckpt, state, meta, budget)


def _first_state(cfg: Config, session: Session, origin: Origin, ckpt: Checkpointer, latest: int | None,
                 log: Callable[[str], None]) -> TrainState:
    """The checkpoint's state (checked finite), else the origin version's params, else a fresh init."""
    if latest is not None:
        state = resume.restore(ckpt, latest, session.abstract_state)
        log(f"resumed from {ckpt.directory / str(latest)}")
    elif origin.load_params is not None:
        strategy = session.strategy
        params = origin.load_params(strategy.model_params(session.abstract_state.params))
        bad = resume.first_nonfinite(params)
        if bad is not None:  # training on would only spread them: refuse before the first step
            raise ConfigError(f"{origin.description} has non-finite values in params/{bad}; not training from it")
        ref = strategy.load_ref(origin, params, session.abstract_state.ref)
        opt_state = origin.load_opt_state(session.abstract_state.opt_state) if cfg.optimizer.carry_state else None
        state = session.init_from_fn(params, ref, jax.random.PRNGKey(cfg.run.seed), opt_state=opt_state)
        kind = strategy.describe(cfg, list(session.groups.table))["kind"]
        log(f"starting from {origin.description} (strategy: {kind})")
    else:  # fresh; a student distilled from another version still needs its teacher
        ref = session.strategy.load_ref(origin, None, session.abstract_state.ref)
        state = session.init_fn(jax.random.PRNGKey(cfg.run.seed), ref=ref)
    if jax.process_index() == 0:
        log(f"devices={jax.device_count()} processes={jax.process_count()} mesh={dict(session.mesh.shape)} "
            f"params={count_params(state.params):,} steps {int(state.step)}->{cfg.train.steps}")
        log(f"compute dtype {precision.describe(cfg.model.dtype)}")
    return state


def _run(started: _Started, on_step: Callable[[int], None] | None, log: Callable[[str], None],
         stop: StopFlag) -> dict[str, Any]:
    """Train from the started state to `train.steps` (or a stop signal), then publish."""
    cfg, session, ckpt, state = started.cfg, started.session, started.ckpt, started.state
    lead = jax.process_index() == 0
    logger = (MetricsLogger(os.path.abspath(cfg.run.dir), tensorboard=cfg.logging.tensorboard, warn=log)
              if lead else None)
    # A process of a multi-process job died: one error line and exit 3 instead of a hang then SIGABRT.
    with session.activate(), ThreadPoolExecutor(1) as prefetch, guards.exit_on_lost_peer():
        try:
            state, step, evals = _loop(started, prefetch, logger, on_step, log, stop)
        finally:  # in-flight async saves complete (or fail loudly) before the process goes on or exits
            ckpt.close()
        version = budget = None
        if step == cfg.train.steps and stop.signal is None:
            evals = evals if evals is not None else session.evaluate(state.params)
            budget = started.budget.describe(evals, session.data.phases) if started.budget else None
            version = _publish(session, started.origin, state, evals, log, started.meta["config_changes"], budget)
    if logger:
        logger.close()
    return {"step": step, "eval_loss": evals["loss"] if evals else None, "state": state,
            "interrupted": stop.signal is not None, "tokens_seen": session.data.tokens_seen(step),
            "data": session.data.describe(), "version": version, "budget": budget}


def _loop(started: _Started, prefetch: ThreadPoolExecutor, logger: MetricsLogger | None,
          on_step: Callable[[int], None] | None, log: Callable[[str], None],
          stop: StopFlag) -> tuple[TrainState, int, dict[str, float] | None]:
    """The training loop: step, log every `logging.every`, evaluate, checkpoint, stop on a signal."""
    cfg, session, ckpt, state, meta = started.cfg, started.session, started.ckpt, started.state, started.meta
    lead = jax.process_index() == 0
    step = int(state.step)
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (lead and cfg.logging.progress),
               dynamic_ncols=True, unit="step")
    pending: list[tuple[int, dict]] = []
    watch = guards.NonFiniteWatch(cfg.train, list(session.groups.leaf_groups), int(state.skipped))
    evals = None
    if started.budget is not None and started.budget.baseline is None:  # fresh: the start params' losses
        _budget_baseline(started, logger)
    t_last = time.perf_counter()
    next_batch = prefetch.submit(session.batch, step)
    try:
        while step < cfg.train.steps:
            batch = next_batch.result()
            if step + 1 < cfg.train.steps:
                next_batch = prefetch.submit(session.batch, step + 1)
            state, metrics = session.step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            if on_step is not None:
                on_step(step)

            at_end = step == cfg.train.steps
            if step % cfg.logging.every == 0 or at_end:
                fetched = jax.device_get(pending)  # the loop's one host sync, every logging.every steps
                pending.clear()
                now = time.perf_counter()
                tok_s = sum(m["tokens"] for _, m in fetched) / max(now - t_last, 1e-9)
                t_last = now
                for s, m in fetched:
                    bad_leaves = m.pop("nonfinite_leaves")
                    if logger:
                        logger.write(s, m)
                    watch.check(s, m, bad_leaves, log)
                bar.set_postfix(loss=f"{fetched[-1][1]['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                if logger:
                    logger.write(step, {"tokens_per_s": tok_s}, prefix="perf")
            if cfg.eval.every and (step % cfg.eval.every == 0 or at_end):
                evals = _evaluate(session, state, step, logger, bar)
                if started.budget is not None:
                    next_batch = _budget_decision(started, step, evals, logger, log, prefetch, next_batch)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or at_end:
                _save(ckpt, step, state, meta)
            if stop.agreed(sync_point=step % cfg.logging.every == 0 or at_end):
                _save(ckpt, step, state, meta)
                log(f"stopping on signal at step {step}; checkpoint saved")
                break
    finally:
        bar.close()
    return state, step, evals


def _budget_baseline(started: _Started, logger: MetricsLogger | None) -> None:
    """Evaluate the start params (the parent's losses): the forgetting budget's baseline, logged at step 0."""
    budget, data = started.budget, started.session.data
    assert budget is not None
    budget.start(started.session.evaluate(started.state.params))
    started.meta["budget"] = budget.state(data.phases)
    if logger:
        logger.write(0, {"replay_fraction": data.phases[-1][1], **{f"{k}/baseline": v for k, v in
                                                                   (budget.baseline or {}).items()}}, prefix="budget")


def _budget_decision(started: _Started, step: int, evals: dict[str, float], logger: MetricsLogger | None,
                     log: Callable[[str], None], prefetch: ThreadPoolExecutor, next_batch: Future) -> Future:
    """The forgetting budget's decision at eval point `step`, logged; a new fraction starts a phase at batch
    `step`, so the batch already prefetched under the old phases is built again. Returns the next batch."""
    budget, session = started.budget, started.session
    assert budget is not None
    fraction = session.data.phases[-1][1]
    decision = budget.observe(step, evals, fraction)
    if decision["to"] != fraction:
        next_batch.result()  # let the prefetch finish before its phases change under it
        session.data.set_phases([*session.data.phases, (step, decision["to"])])
        if step < started.cfg.train.steps:
            next_batch = prefetch.submit(session.batch, step)
        if jax.process_index() == 0:
            log(budget.message(decision))
    started.meta["budget"] = budget.state(session.data.phases)
    if logger:
        logger.write(step, budget.metrics(decision), prefix="budget")
    return next_batch


def _save(ckpt: Checkpointer, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    if step not in ckpt.all_steps():  # (the stop save may land on a step just saved)
        ckpt.save(step, state, {**meta, "digest": resume.digest(state)}, force=True)


def _evaluate(session: Session, state: TrainState, step: int, logger: MetricsLogger | None, bar: tqdm
              ) -> dict[str, float]:
    evals = session.evaluate(state.params)
    if logger:
        logger.write(step, evals, prefix="eval")
        logger.write(step, {f"{k}_tokens": v for k, v in session.data.tokens_seen(step).items()}, prefix="data")
    if jax.process_index() == 0:
        per_source = ", ".join(f"{k.removesuffix('/loss')} {v:.4f}" for k, v in evals.items() if k != "loss")
        bar.write(f"step {step}: eval loss {evals['loss']:.4f} ({per_source})")
    return evals
