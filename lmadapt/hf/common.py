"""What every part of the Hugging Face interchange shares: its error, file names, dtypes and JSON files."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from typing import Any

import ml_dtypes
import numpy as np

from lmadapt.files import paths

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Export dtypes (the names transformers writes into config.json) and their numpy dtypes.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


class HFError(ValueError):
    """A Hugging Face checkpoint or config that cannot be converted; the message names the file, key or tensor."""


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`; unreadable, malformed or non-object files are an HFError naming it."""
    obj = paths.read_json(path, HFError)
    if not isinstance(obj, dict):
        raise HFError(f"{path}: expected a JSON object")
    return obj


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON (a new file: callers write into a fresh staging directory)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def check_empty_target(directory: str) -> str:
    """The absolute path of `directory`, refused if it exists and is not an empty directory.

    A symlink is followed (an output directory linked onto a bigger disk): the checkpoint is renamed into the
    directory it points to, since rename(2) cannot replace a symlink by a directory."""
    directory = os.path.realpath(os.path.expanduser(directory))
    if os.path.lexists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise HFError(f"{directory}: exists and is not an empty directory; refusing to overwrite")
    _check_parent(directory)
    return directory


def check_new_file(path: str) -> str:
    """The absolute path of `path`, refused if anything (a file, a directory, a dangling symlink) is there."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path):
        raise HFError(f"{path}: exists; refusing to overwrite")
    _check_parent(path)
    return path


def _check_parent(path: str) -> None:
    """Refuse a target whose folder cannot be made or written (a file where a folder is wanted, a read-only
    disk) before any work; missing folders are fine: they are created, as save_pretrained does."""
    parent = os.path.dirname(path)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HFError(f"{path}: {parent} is not a directory; cannot write there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HFError(f"{path}: {parent} is not writable")


def make_parents(path: str) -> list[str]:
    """Create the missing folders above `path`; return those created, outermost first (for `remove_made`)."""
    missing, parent = [], os.path.dirname(path)
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    made = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            made.append(folder)
        except FileExistsError:  # made meanwhile by someone else: theirs, not ours to remove
            pass
    return made


def remove_made(folders: list[str]) -> None:
    """Remove folders `make_parents` created, innermost first, where they are still empty (after a failed
    write: an export that did not happen leaves nothing behind)."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


def make_staging_dir(directory: str) -> str:
    """A fresh hidden sibling of `directory` to write an export into, named after this host and process; first
    removes the ones that dead processes of this host left (a killed export would otherwise leave up to a whole
    model's bytes behind, unseen). Other hosts' and live processes' staging directories are left alone."""
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:64]
    for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-{host}-*-*")):
        pid = os.path.basename(stale)[len(f".{base}.tmp-{host}-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f".{base}.tmp-{host}-{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
