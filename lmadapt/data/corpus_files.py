"""Finding, opening and hashing a source's files: paths, folders and globs listed once each (a symlink loop
walked once), pipes and devices refused unopened, .gz and .xz read decompressed, hashes remembered by stat.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import gzip
import hashlib
import json
import lzma
import os
import socket
import sysconfig
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from lmadapt.data import DataError
from lmadapt.data.written import Written
from lmadapt.files.paths import Found, dir_problem, file_problem, open_regular, walk_files


def list_files(pattern: str, what: str) -> list[str]:
    """Files named by a path, a folder (recursively, sorted) or a glob; an error if there are none.

    Each real file is listed once (the first path to it, in sorted order): a second symlink to a file, or a
    symlink loop a folder walk or a `**` glob would go round, must not read the same text into both the train
    and the held-out split. A pipe, device or socket among the matches is refused by name, never opened.
    """
    # `{stdlib}`: the running Python's standard library, a code corpus present on every machine.
    expanded = os.path.expanduser(pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"]))
    if dir_problem(expanded) is None:
        found = [f for f in _walk(expanded, what) if not os.path.basename(f.path).startswith(".")]
    elif glob.has_magic(expanded) and not os.path.lexists(expanded):
        found = _glob(expanded, what)
    elif (problem := file_problem(expanded)) is None:
        found = [Found(expanded, os.path.realpath(expanded), None)]
    elif problem == "not found":
        raise DataError(f"{what}: path {pattern!r} not found")
    else:
        raise DataError(f"{what}: path {pattern!r} {problem.replace('regular file', 'regular file or folder')}")
    files, real = [], set()
    for f in sorted(found):
        if f.problem is not None:
            raise DataError(f"{what}: {pattern!r} matches {f.path}, which {f.problem}")
        if f.real not in real:
            real.add(f.real)
            files.append(f.path)
    if not files:
        raise DataError(f"{what}: {pattern!r} matches no files")
    return files


def _walk(folder: str, what: str, hidden_folders: bool = True) -> list[Found]:
    try:
        return list(walk_files(folder, hidden_folders))
    except OSError as e:
        raise DataError(f"{what}: cannot list folder {e.filename or folder} ({e.strerror})") from None


def _glob(pattern: str, what: str) -> list[Found]:
    """Every non-directory a glob matches. A `**` pattern is matched on a walk of its fixed leading folder that
    enters each real folder once: glob.glob follows symlinked folders, so a loop would repeat every file below
    it dozens of times (and two loops, exponentially many)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return [Found(p, os.path.realpath(p), file_problem(p)) for p in glob.glob(pattern)
                if dir_problem(p) is not None]
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "")
    if dir_problem(base or ".") is not None:
        return []
    # Paths relative to base are matched; with no fixed folder, they are also what is listed (as glob.glob).
    start, rest = len(os.path.join(base or ".", "")), parts[fixed:]
    hidden = any(part.startswith(".") for part in rest)  # else `*` and `**` never enter a ".*" folder
    found = [f if base else f._replace(path=f.path[start:]) for f in _walk(base or ".", what, hidden)]
    return [f for f in found if _glob_match(f.path[start if base else 0:].split(os.sep), rest)]


def _glob_match(names: list[str], parts: list[str]) -> bool:
    """Whether path components `names` match pattern components `parts` as glob.glob would: `*`, `?`, `[...]`
    within one name, `**` for any number of folders, and no name starting with "." unless its part does."""
    if not parts:
        return not names
    if parts[-1] != "**" and not (names and fnmatch.fnmatchcase(names[-1], parts[-1])):
        return False  # most names fail on the last part: checked first, it saves the search
    if parts[0] == "**":
        return any(_glob_match(names[k:], parts[1:]) for k in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:k]))
    return (bool(names) and (parts[0].startswith(".") or not names[0].startswith("."))
            and fnmatch.fnmatchcase(names[0], parts[0]) and _glob_match(names[1:], parts[1:]))


@contextlib.contextmanager
def open_content(path: str) -> Iterator[BinaryIO]:
    """The (decompressed) content of a plain, .gz or .xz file; a pipe, device or folder is refused unopened."""
    with open_regular(path, DataError) as raw:
        try:
            if path.endswith((".xz", ".gz")):
                with (lzma.open(raw, "rb") if path.endswith(".xz") else gzip.open(raw, "rb")) as f:
                    yield f
            else:
                yield raw
        except (OSError, lzma.LZMAError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def read_bytes(path: str) -> bytes:
    """Raw bytes of a plain, .gz or .xz file; a pipe, device or folder is refused without being opened."""
    with open_content(path) as f:
        return f.read()


def file_digest(path: str, memo: DigestMemo | None = None) -> dict[str, Any]:
    """A file's path, content size and sha256, streamed in 1 MiB pieces (memory independent of its size); from
    `memo` when it holds the file's hash for its present size, mtime and inode."""
    if memo is not None and (known := memo.get(path)) is not None:
        return known
    before = _stat(path)
    digest, size = hashlib.sha256(), 0
    with open_content(path) as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    out = {"path": os.path.abspath(path), "bytes": size, "sha256": digest.hexdigest()}
    if memo is not None and before is not None and _stat(path) == before:
        memo.put(path, out, before)
    return out


def _stat(path: str) -> list[int] | None:
    """What a remembered hash is keyed by: size, mtime (ns) and inode; not the device, which differs between
    the NFS clients of one file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class DigestMemo:
    """Files' hashes remembered by (size, mtime in ns, inode), in `folder` (the cache's `files/`).

    A large corpus is hashed once, not by every run and process: a run whose tokens are prepared then opens
    only the files it reads, as make and git do with their stat caches. As git does, a hash is remembered only
    for a file unchanged while it was hashed and last modified at least `RACY_S` before (a file written within
    the same mtime tick could change again unseen). A file rewritten in place keeping its size, mtime and inode
    would keep its old hash; every file actually read is hashed again as it is read. New entries go to
    `written` (what a refused run removes again)."""

    RACY_S = 2.0

    def __init__(self, folder: str, written: Written):
        self.folder, self.written = folder, written

    def _entry(self, path: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:40] + ".json")

    def get(self, path: str) -> dict[str, Any] | None:
        stat = _stat(path)
        try:
            with open(self._entry(path), encoding="utf-8") as f:
                known = json.load(f)
        except (OSError, ValueError):
            return None
        ok = stat is not None and isinstance(known, dict) and known.get("stat") == stat
        ok = ok and known.get("path") == os.path.abspath(path) and "sha256" in known and "bytes" in known
        return {k: known[k] for k in ("path", "bytes", "sha256")} if ok else None

    def put(self, path: str, digest: dict[str, Any], stat: list[int]) -> None:
        if time.time_ns() - stat[1] < self.RACY_S * 1e9:
            return
        entry = self._entry(path)
        with contextlib.suppress(OSError):  # a read-only or full cache: the hash is just not remembered
            self.written.folders(self.folder)
            tmp = f"{entry}.{socket.gethostname()}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**digest, "stat": stat}, f)
            os.replace(tmp, entry)
            self.written.add(entry)
