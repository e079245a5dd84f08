"""Publishing a version: the room check, the staging directory and the commit rename, and the words for a
file system's failure. `Lineage.publish` takes the per-id lock and checks the graph before calling in here.

A version is written into `.staging/<id>.<nonce>` (holding `owner.json`: host and pid, so a later publish on
this host can remove the copy a crashed one left) and renamed into `versions/<id>` in one step.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmadapt.data.tokenizers import Tokenizer
from lmadapt.files import manifest, paths
from lmadapt.lineage.records import LineageError

RECORD = "record.json"
OWNER = "owner.json"  # in a staging directory: which host and process is writing it


def stage_and_commit(directory: str, final: str, version_id: str, params: Any, artifacts: dict[str, Any],
                     tokenizer: Tokenizer, record: dict[str, Any]) -> None:
    """Write a version into a staging directory of `directory` and rename it to `final` (the commit);
    on any failure the staging copy is removed. Every process calls it; process 0 writes the small files."""
    lead = jax.process_index() == 0
    # A staging directory of its own per publish (the nonce is shared by the job's processes), so two
    # jobs publishing at once never write into one directory.
    staging = os.path.join(directory, ".staging", f"{version_id}.{_shared_nonce():016x}")
    failed = ""
    try:
        if lead:
            _remove_abandoned_staging(os.path.dirname(staging))
            os.makedirs(staging)
            write_json(os.path.join(staging, OWNER), {"host": socket.gethostname(), "pid": os.getpid()})
        sync("lineage-staging")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(staging, "params"), params)
            for name, tree in artifacts.items():
                ckptr.save(os.path.join(staging, "artifacts", name), tree)
            ckptr.wait_until_finished()
        if lead:
            os.remove(os.path.join(staging, OWNER))
            tokenizer.save(staging)
            write_json(os.path.join(staging, RECORD), record)
            manifest.write(staging)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(staging, final)  # the commit: atomic, and refuses an existing non-empty target
            except OSError:
                if not os.path.exists(final):
                    raise
                # The last line of defence (the per-id lock keeps out publishers that take it).
                failed = (f"version {version_id!r} was published to {final} by another process while this one "
                          f"was writing it; this copy was discarded: choose another version.id")
    except BaseException:
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if failed:
        shutil.rmtree(staging, ignore_errors=True)
    sync("lineage-commit")
    if failed:
        raise LineageError(failed)


def check_room(directory: str, trees: list[Any], version_id: str) -> None:
    """Refuse before writing when the lineage's disk cannot hold the arrays (Orbax, failing midway, would log
    tracebacks from its threads before the error arrives)."""
    need = sum(x.size * x.dtype.itemsize for t in trees for x in jax.tree.leaves(t) if hasattr(x, "dtype"))
    probe = directory
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise LineageError(f"version {version_id!r} cannot be published to lineage {directory}: no space left on "
                           f"device ({free / 2**20:,.2f} MiB free, the params need about {need / 2**20:,.2f} MiB); "
                           f"nothing was written")


def os_failure(e: BaseException) -> str | None:
    """What a failed write ran into, in words, when it is the file system's doing (also when Orbax or
    TensorStore wrapped the OS error in its own exception); None for anything else (a bug: re-raised)."""
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{(e.strerror or str(e)).lower()}{where}"
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code and int(code.group(1)) in errno.errorcode:
        return os.strerror(int(code.group(1))).lower()
    for number in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO):
        if os.strerror(number) in str(e):
            return os.strerror(number).lower()
    return None


def _shared_nonce() -> int:
    """A random 64-bit number, the same on every process of the job."""
    nonce = np.array(secrets.randbits(63), dtype=np.int64)
    if jax.process_count() > 1:
        nonce = multihost_utils.broadcast_one_to_all(nonce)
    return int(nonce)


def _remove_abandoned_staging(root: str) -> None:
    """Delete staging directories left by publishes that crashed on this host (their process is gone);
    those of live processes, or of other hosts, are left alone."""
    if not os.path.isdir(root):
        return
    host = socket.gethostname()
    for name in os.listdir(root):
        try:
            owner = paths.read_json(os.path.join(root, name, OWNER), ValueError)
        except ValueError:
            continue  # being committed right now, a lock file, or not ours to judge
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and owner.get("host") == host and not _pid_alive(pid):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON (manifest.write_json), numpy scalars written as numbers."""
    manifest.write_json(path, obj, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def sync(name: str) -> None:
    """A barrier across the job's processes (nothing for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


