"""What keeps a run safe when something goes wrong: signals, non-finite steps, lost peers, unwritable or
full disks, damaged checkpoints. The trainer calls these; each one either lets the run go on or stops
it with one line that says what happened and what is still intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from lmadapt.config import ConfigError


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
    existing = nearest_existing(directory)
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


def check_room(directory: str, tree: Any, key: str, what: str) -> None:
    """Fail before training if the disk of `directory` (config key `key`) cannot hold `tree` (`what`)."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    free = shutil.disk_usage(nearest_existing(directory)).free
    if free < need:
        raise ConfigError(f"{key}: {directory} has {free / 2**20:,.1f} MiB free, but {what} needs about "
                          f"{need / 2**20:,.1f} MiB")


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its nearest existing parent."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
