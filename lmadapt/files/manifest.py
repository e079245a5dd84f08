"""Content manifests of written directories (model versions, checkpoints), and refusal of untrusted files.

`MANIFEST.json` lists the size and sha256 of every file under a directory when it was written; `check`
recomputes them, so a truncated, byte-flipped, removed or added file is named before anything is read.
Independently of any manifest, a directory holding a pickle file or a symlink that leaves it is refused:
lmadapt never writes either, so one can only have been put there by someone else.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from lmadapt.files import paths

MANIFEST = "MANIFEST.json"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt")
# Pickle protocols 2-5 start with PROTO (0x80) and the protocol number; Orbax/TensorStore files start
# with JSON, the OCDBT magic (0x0c 0xdb) or zstd's, so the test cannot misfire on our own files.
PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))


def compute(root: str, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `root` except the manifest itself and
    the relative paths in `exclude`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel == MANIFEST or rel in exclude or os.path.islink(full) or paths.file_problem(full):
                continue  # links and special files (a pipe would block the read) are `untrusted`'s to report
            h = hashlib.sha256()
            with paths.open_regular(full, OSError) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = {"bytes": os.path.getsize(full), "sha256": h.hexdigest()}
    return dict(sorted(out.items()))


def write(root: str, exclude: tuple[str, ...] = ()) -> None:
    """Record the current contents of `root` in `root/MANIFEST.json` (written aside, then renamed)."""
    write_json(os.path.join(root, MANIFEST), compute(root, exclude))


def has_manifest(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MANIFEST))


def untrusted(root: str) -> list[str]:
    """Symlinks that point outside `root` and pickle files (by name or by their first bytes)."""
    problems = []
    real_root = os.path.realpath(root)
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if os.path.commonpath([real_root, target]) != real_root:
                    problems.append(f"{rel}: a symlink to {target}, outside {root}; refused")
            elif name in files and (problem := paths.file_problem(full)):
                problems.append(f"{rel} {problem}; lmadapt writes only regular files, refused")
            elif name in files and (name.lower().endswith(PICKLE_SUFFIXES) or _starts_like_pickle(full)):
                problems.append(f"{rel}: a pickle file; pickle is never loaded, refused")
    return problems


def check(root: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Problems with `root` (empty if intact): untrusted files, then files missing, added or changed
    since the manifest was written (`exclude`: as given to `write`). A directory without a manifest
    is reported as such."""
    problems = untrusted(root)
    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        return [*problems, f"{MANIFEST}: missing (the contents cannot be verified)"]
    try:
        expected = paths.read_json(path, ValueError)
        if not isinstance(expected, dict) or not all(isinstance(v, dict) for v in expected.values()):
            raise ValueError(f"{path}: not an object of file entries")
    except ValueError as e:
        return [*problems, f"{MANIFEST}: unreadable ({str(e).removeprefix(path + ': ')})"]
    actual = compute(root, exclude)
    problems += [f"{p}: missing" for p in sorted(set(expected) - set(actual))]
    problems += [f"{p}: not in the manifest (added after writing)" for p in sorted(set(actual) - set(expected))]
    for p in sorted(set(actual) & set(expected)):
        got, want = actual[p], expected[p]
        if got == want:
            continue
        if isinstance(want, dict) and got["bytes"] != want.get("bytes"):
            problems.append(f"{p}: {got['bytes']} bytes, {want.get('bytes')} when written (truncated or extended)")
        else:
            problems.append(f"{p}: contents changed (sha256 {got['sha256'][:12]}..., written "
                            f"{str(want.get('sha256', '?'))[:12]}...)")
    return problems


def summary(problems: list[str]) -> str:
    """The first problem, and how many more: one line for an error message."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def write_json(path: str, obj: Any, default: Any = None) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _starts_like_pickle(path: str) -> bool:
    try:
        with paths.open_regular(path, OSError) as f:
            return f.read(2) in PICKLE_MAGIC
    except OSError:
        return False
