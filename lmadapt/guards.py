"""What keeps a run safe when something goes wrong: signals, non-finite steps, lost peers, unwritable or
full disks, damaged checkpoints. The trainer calls these; each one either lets the run go on or stops
it with one line that says what happened and what is still intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmadapt.checkpoint import Checkpointer, CheckpointError
from lmadapt.config import ConfigError
from lmadapt.manifest import MANIFEST, summary


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses under the stop policy); the message says why and
    what is still intact."""


class NonFiniteWatch:
    """Applies `train.on_nonfinite` to the fetched step metrics. The step itself already kept a bad
    update out of the state, so every checkpoint stays sound whatever happens here."""

    def __init__(self, cfg: Any, leaf_groups: list[tuple[str, str]], skipped: int) -> None:
        self.cfg, self.leaf_groups, self.skipped, self.in_a_row = cfg, leaf_groups, skipped, 0

    def check(self, step: int, m: dict[str, Any], bad: np.ndarray, log: Callable[[str], None]) -> None:
        """Log (skip) or raise TrainingError (stop) if step `step` was not applied; `bad` flags its leaves."""
        skipped = int(m["skipped"])
        if skipped == self.skipped:
            self.in_a_row = 0
            return
        self.skipped, self.in_a_row = skipped, self.in_a_row + 1
        where = [self.leaf_groups[i] for i in np.flatnonzero(bad)]
        groups = list(dict.fromkeys(g for _, g in where))
        what = (f"non-finite gradients in group {groups[0]!r} first ({where[0][0]}; {len(where)} leaves in "
                f"groups {', '.join(groups)})" if where else "non-finite loss or penalty, gradients finite")
        message = f"step {step}: loss {float(m['loss']):.4g}, {what}; the update was not applied"
        if self.cfg.on_nonfinite == "stop":
            raise TrainingError(f"{message} (train.on_nonfinite=stop); checkpoints up to here are intact")
        log(f"{message}, skipped ({skipped} so far)")
        limit = self.cfg.max_nonfinite_in_a_row
        if limit and self.in_a_row >= limit:
            raise TrainingError(f"{message}: {self.in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row="
                                f"{limit}); checkpoints up to here are intact; lower the learning rate or check "
                                f"the data")


class StopFlag:
    """Set by SIGTERM/SIGINT; checked between steps so a preempted job saves and exits cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, sync_point: bool) -> bool:
        """Whether to stop now. With several processes all must stop at the same step, so they only
        compare flags at sync points (the logging steps); a single process stops at the next step."""
        if jax.process_count() == 1:
            return self.signal is not None
        if not sync_point:
            return False
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.signal is not None))))


LOST_PEER_EXIT_CODE = 3  # a multi-process job that lost a process (config errors exit 2)


@contextlib.contextmanager
def exit_on_lost_peer() -> Iterator[None]:
    """In a multi-process job, end this process with one `error:` line and exit code 3 when a
    cross-process operation fails; a single process is left alone.

    When a process of the job dies, its sockets close and the survivors' next collective fails at once
    (on CPU: JaxRuntimeError "Gloo ... failed: Connection reset by peer"). Left to propagate, that error would
    end in JAX's atexit shutdown, which waits for the dead process at a barrier until
    `distributed.heartbeat_timeout` and then aborts (SIGABRT, pages of gRPC detail). `os._exit` skips it.
    A peer that hangs or whose host vanishes, or a dead coordinator, is instead caught by JAX's
    coordination service: it aborts the survivors after at most the heartbeat timeout, also when they
    are blocked in a collective ("Terminating process because the JAX distributed service detected
    fatal errors. This most likely indicates that another task died").
    """
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        sys.stdout.flush()
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: {first.strip()}. In a "
              f"multi-process job this means another process died or is unreachable (see its log), unless this "
              f"one failed on its own. Restart all processes on the same run.dir: training resumes from the "
              f"last complete checkpoint", file=sys.stderr, flush=True)
        os._exit(LOST_PEER_EXIT_CODE)


def check_writable(directory: str, key: str) -> None:
    """Fail before any compile or data work if `directory` could not be written (read-only, no
    permission, a file in the way). Nothing is left behind: a directory not there yet is not created,
    its nearest existing parent is probed instead."""
    existing = _nearest_existing(directory)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: {directory} cannot be created: {existing} is not a directory")
    probe = os.path.join(existing, f".lmadapt-write-test-{os.getpid()}-{jax.process_index()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: {directory} is not writable ({e.strerror or e})") from None


def check_room(run_dir: str, abstract_state: Any) -> None:
    """Fail before training if the run's disk cannot hold even one checkpoint of the state."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = shutil.disk_usage(_nearest_existing(run_dir)).free
    if free < need:
        raise ConfigError(f"run.dir: {run_dir} has {free / 2**20:,.1f} MiB free, but one checkpoint of this "
                          f"state needs about {need / 2**20:,.1f} MiB")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def resume_point(ckpt: Checkpointer, log: Callable[[str], None]) -> int | None:
    """The checkpoint to resume from: the newest, once its manifest checks out (process 0 checks, all
    processes agree). A damaged one raises CheckpointError naming the file and an earlier intact one."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    problems = ckpt.verify(latest) if jax.process_index() == 0 else []
    unsealed = len(problems) == 1 and problems[0].startswith(f"{MANIFEST}: missing")
    damaged = bool(problems) and not unsealed
    if jax.process_count() > 1:
        damaged = bool(multihost_utils.broadcast_one_to_all(np.int32(damaged)))
    where = ckpt.directory / str(latest)
    if damaged:
        detail = summary(problems) if problems else "see the log of process 0"
        raise CheckpointError(f"checkpoint {where} is damaged: {detail}; not resuming from it; "
                              f"{intact_hint(ckpt, latest)}")
    if unsealed:
        log(f"checkpoint {where} was committed but not sealed (the run stopped right after saving it); "
            f"resuming from it without a content check")
    return latest


def intact_hint(ckpt: Checkpointer, step: int) -> str:
    """What to do about damaged checkpoint `step`: the newest earlier intact one, if any."""
    earlier = ckpt.newest_intact(below=step)
    if earlier is None:
        return "no earlier checkpoint is intact"
    return (f"checkpoint {earlier} is intact: move {ckpt.directory / str(step)} out of {ckpt.directory} and "
            f"restart to resume from step {earlier}")
