"""Evaluation results cached beside a lineage's versions: `metrics/<id>.json`, {key: entry}.

A version never changes, but its id can be reused (a version deleted by hand, another published under
its id), so an entry is only believed for the params it was computed from: each carries the version's
`params_hash` (and the eval's tokenizer fingerprint and seq_len; the key is the dataset's fingerprint).
An entry whose params hash is not the version's is stale and ignored. A cache file that is damaged (not
JSON, not an object, entries that are not objects) is ignored with a one-line warning, never a crash, and
never overwritten: the results are recomputed and reported, and the file is left for its owner to look at.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from lmadapt.lineage.records import VERSION_ID, LineageError, read_json_object


def warn(message: str) -> None:
    """One warning line on stderr (the CLIs' convention; never a traceback)."""
    print(f"warning: {message}", file=sys.stderr)


def read_entries(path: str) -> dict[str, Any]:
    """The raw {key: entry} of a metrics file ({} if there is none); LineageError if it is damaged."""
    if not os.path.lexists(path):
        return {}
    return read_json_object(path)


def usable_entries(path: str, params_hash: str | None, *, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """The entries of `path` that are objects and not stale (computed from params other than `params_hash`);
    a damaged file or entry is skipped with a warning unless `quiet`."""
    try:
        entries = read_entries(path)
    except LineageError as e:
        if not quiet:
            warn(f"{e}; its cached evaluation results are ignored, and it is not overwritten: remove it to "
                 f"cache again")
        return {}
    bad = [k for k, v in entries.items() if not isinstance(v, dict)]
    if bad and not quiet:
        warn(f"{path}: entries {', '.join(repr(k) for k in bad[:3])}{' ...' if len(bad) > 3 else ''} are not "
             f"JSON objects; ignored")
    return {k: v for k, v in entries.items() if isinstance(v, dict) and not is_stale(v, params_hash)}


def is_stale(entry: dict[str, Any], params_hash: str | None) -> bool:
    """Whether `entry` names params other than the version's (an entry without a hash is not judged here)."""
    return "params_hash" in entry and entry["params_hash"] != params_hash


def unwritable(path: str) -> str | None:
    """Why `path` (or, if missing, the folder it would be created in) cannot be written, or None. Asks the
    kernel (access(2): a read-only mount or permissions) rather than trying a write: callers are readers."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.exists(probe) and not os.path.isdir(probe):
        return f"{probe} is not a directory"
    if os.access(probe, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{probe} is on a read-only file system" if read_only else f"{probe}: {os.strerror(errno.EACCES)}"


def check_metrics_dir(directory: str, versions: dict[str, str | None],
                      only: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of `<lineage>/metrics`: `versions` maps each version id to its params hash (None when
    its record is unreadable). Problems: unreadable files, entries that are not objects, files of versions
    not in the lineage. Notes: stale entries (harmless, they are ignored) and entries without a params hash
    (written before results carried one; ignored by eval). `only`: look at these versions' files alone."""
    root = os.path.join(directory, "metrics")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    if only is not None:
        names = [f"{v}.json" for v in only if os.path.lexists(os.path.join(root, f"{v}.json"))]
    problems, notes = [], []
    for name in names:
        rel, vid = f"metrics/{name}", name.removesuffix(".json")
        if not name.endswith(".json") or not VERSION_ID.fullmatch(vid):
            notes.append(f"{rel}: not a metrics file (an interrupted write leaves such files); it is never read")
            continue
        if vid not in versions:
            problems.append(f"{rel}: there is no version {vid!r} in the lineage (was it deleted?); remove the file")
            continue
        try:
            entries = read_entries(os.path.join(root, name))
        except LineageError as e:
            problems.append(f"{rel}: {str(e).split(': ', 1)[-1]}; its results are ignored")
            continue
        bad = [k for k, v in entries.items() if not isinstance(v, dict)]
        if bad:
            problems.append(f"{rel}: entries {', '.join(map(repr, bad[:3]))} are not JSON objects; ignored")
        entries = {k: v for k, v in entries.items() if isinstance(v, dict)}
        stale = [k for k, v in entries.items() if is_stale(v, versions[vid])]
        if stale:
            notes.append(f"{rel}: {len(stale)} cached result(s) ({', '.join(map(repr, stale[:3]))}) were computed "
                         f"from other params than version {vid!r}'s; they are ignored")
        unhashed = [k for k, v in entries.items() if "params_hash" not in v]
        if unhashed:
            notes.append(f"{rel}: {len(unhashed)} result(s) carry no params hash; eval.py ignores and recomputes "
                         f"them")
    return problems, notes
