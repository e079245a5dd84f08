"""What is at a path before it is read: a regular file, a directory, or something that must not be opened.

Opening a named pipe blocks until a writer appears, and a device (/dev/zero) never ends, so every reader of
user-given paths (data sources, configs, tokenizers, Hugging Face checkpoints) asks here first, with `stat`
(which opens nothing), and says in words what the path is when it is the wrong kind. `open_regular` closes the
remaining race (a file swapped for a pipe between the check and the open) without blocking.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def describe(mode: int) -> str:
    """A file type in words ("a regular file", "a named pipe (FIFO)", ...), from an st_mode."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _stat(path: str) -> os.stat_result | str:
    """The stat of `path` (symlinks followed), or why there is none, as a phrase to follow the path."""
    try:
        return os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "is a dangling symlink" if os.path.islink(path) else "not found"
        return f"cannot be examined ({e.strerror})"


def file_problem(path: str) -> str | None:
    """None when `path` is a regular file (symlinks followed); else why not, as a phrase to follow the path:
    "not found", "is a named pipe (FIFO), not a regular file", "is a directory, not a regular file", ..."""
    st = _stat(path)
    if isinstance(st, str):
        return st
    return None if stat.S_ISREG(st.st_mode) else f"is {describe(st.st_mode)}, not a regular file"


def dir_problem(path: str) -> str | None:
    """None when `path` is a directory (symlinks followed); else why not, as `file_problem`."""
    st = _stat(path)
    if isinstance(st, str):
        return st
    return None if stat.S_ISDIR(st.st_mode) else f"is {describe(st.st_mode)}, not a directory"


def special_problem(path: str) -> str | None:
    """For an optional file: None when nothing is at `path` or it is a regular file; else why it cannot be read
    (a pipe, a device, a directory, a symlink loop). A dangling symlink counts as nothing there."""
    problem = file_problem(path)
    return None if problem in (None, "not found", "is a dangling symlink") else problem


def open_regular(path: str, error: type[Exception]) -> BinaryIO:
    """`path` opened for binary reading, refused with `error("<path> <why>")` unless it is a regular file.

    Checked with stat first, so a device is never opened; then opened non-blocking and checked again on the
    descriptor, so a pipe put there in between cannot block the open."""
    problem = file_problem(path)
    if problem is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        os.close(fd)
        problem = f"is {describe(mode)}, not a regular file"
    raise error(f"{path} {problem}")


class Found(NamedTuple):
    """A non-directory entry `walk_files` found: its path, its real path, and why it cannot be read (None: a
    regular file; else as `file_problem`)."""

    path: str
    real: str
    problem: str | None


def walk_files(top: str, hidden_folders: bool = True) -> Iterator[Found]:
    """Every non-directory entry under directory `top`, symlinks followed, depth first in name order. Each real
    directory is entered once, so a symlink loop (`ln -s . loop`) or a second link to a folder adds nothing.
    `hidden_folders` False: folders named ".*" are not entered. Unlistable folders raise OSError."""
    seen: set[str] = set()
    stack = [(top, os.path.realpath(top))]
    while stack:
        folder, real = stack.pop()
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_dir, is_file, link = entry.is_dir(), entry.is_file(), entry.is_symlink()  # dir/file follow links
            except OSError:
                is_dir, is_file, link = False, False, True
            # Real paths come from the folder's unless the entry is a link: no realpath (an lstat a part) each.
            entry_real = os.path.realpath(path) if link else os.path.join(real, entry.name)
            if is_dir:
                if hidden_folders or not entry.name.startswith("."):
                    subfolders.append((path, entry_real))
            else:
                yield Found(path, entry_real, None if is_file else file_problem(path))
        stack.extend(reversed(subfolders))


JSON_LIMIT = 64 << 20  # records, manifests and metadata are kilobytes; a bigger one is not ours


def read_json(path: str, error: type[Exception], limit: int = JSON_LIMIT) -> Any:
    """The JSON value in `path`, or `error("<path>: <why>")` in one line: not a regular file (never opened if
    a pipe or device), over `limit` bytes, not UTF-8, malformed, or nested too deep for the parser (which
    raises RecursionError, not ValueError)."""
    with open_regular(path, error) as f:
        blob = f.read(limit + 1)
    if len(blob) > limit:
        raise error(f"{path}: over {limit >> 20} MiB, not a file lmadapt wrote")
    try:
        return json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise error(f"{path}: unreadable JSON ({reason})") from None
