"""One writer at a time: an advisory lock on a file, holding who took it.

`fcntl.flock` on `<dir>/<name>`: the kernel releases it when the holder's process dies (SIGKILL
included), so a crash never leaves a stale lock behind, and nothing needs to be cleaned up by hand.
The file holds the holder's host, pid, start time and command line, so the refusal can name it. Two
opens of one file conflict even inside one process, so tests can take a lock twice in-process.

Not promised: flock is per host on most network file systems (NFS before v4 locks nothing across
hosts; object-store mounts lock nothing), so two jobs on two hosts sharing a run directory over
such a mount are not kept apart.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import stat
import sys
from collections.abc import Iterator

from lmadapt.config import ConfigError
from lmadapt.files import paths


class LockHeld(ConfigError):
    """Another live process holds the lock; the message names it (host, pid, since when, command)."""


def holder(path: str) -> str:
    """Who holds (or last held) the lock at `path`, in words."""
    try:
        info = paths.read_json(path, ValueError)
        return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')} "
                f"({info.get('command')})")
    except (OSError, ValueError, AttributeError):
        return "another process (its details are being written)"


@contextlib.contextmanager
def exclusive(path: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the body, or raise LockHeld at once
    naming `what` and the holder. Never blocks: a second job must not queue behind a live one."""
    try:  # O_NOFOLLOW: a symlink planted at the lock's name must not redirect our writes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"{what}: cannot open its lock file {path} ({e.strerror or e}); it must be a regular "
                          f"file lmadapt can write") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{what}: its lock file {path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{what} is in use by {holder(path)}; lock {path}. Two writers would corrupt each "
                           f"other: wait for it to finish or stop it, or use another directory") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


@contextlib.contextmanager
def exclusive_for_job(path: str, what: str) -> Iterator[None]:
    """`exclusive` for a multi-process job: process 0 takes the lock and every process learns whether it
    got it, so all of them stop (or go on) together. A single process just takes it."""
    import jax

    if jax.process_count() == 1:
        with exclusive(path, what):
            yield
        return
    import numpy as np
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        refused = ""
        if jax.process_index() == 0:
            try:
                stack.enter_context(exclusive(path, what))
            except LockHeld as e:
                refused = str(e)
        if bool(multihost_utils.broadcast_one_to_all(np.int32(bool(refused)))):
            raise LockHeld(refused or f"{what} is in use by another job (lock {path}, held against process 0: "
                                      f"see its log)")
        yield
