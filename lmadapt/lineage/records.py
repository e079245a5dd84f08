"""Version records and the version graph: what a record must hold, and how the parents may link versions.

A record is `versions/<id>/record.json`; one edited by hand, truncated or written by another tool is named
with the field that is wrong when it is read, never half-used. The graph (each record's `parents`) must
name only versions of the lineage and must not loop; it can loop when records are edited by hand, or when a
version is deleted and a new one is published under its id with a child of the old one as its parent.
Everything here only reads.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from lmadapt.files import paths

VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Field -> (accepted types, how an error message says it); bool is refused where an int is wanted.
REQUIRED_FIELDS: dict[str, tuple[type, str]] = {
    "id": (str, "the version id (its directory's name)"), "parents": (list, "a list of version ids"),
    "created": (str, "an ISO 8601 time"), "model": (dict, "the model config (a JSON object)"),
    "tokenizer": (str, "the tokenizer fingerprint (a string)"), "params_hash": (str, "'sha256:' and 64 hex digits"),
    "steps": (int, "a whole number >= 0"), "tokens": (int, "a whole number >= 0"),
}

OPTIONAL_FIELDS: dict[str, tuple[type, str]] = {
    "note": (str, "a string"), "metrics": (dict, "a JSON object"), "config": (dict, "a JSON object"),
    "data": (dict, "a JSON object"), "strategy": (dict, "a JSON object"), "artifacts": (list, "a list of names"),
}


class LineageError(ValueError):
    """A lineage operation cannot be done; the message names the version and the reason."""


def check_version_id(version_id: str) -> str:
    """Version ids name directories: letters, digits, '_', '-', '.', no path separators, no '..'."""
    if not isinstance(version_id, str) or not VERSION_ID.fullmatch(version_id) or ".." in version_id:
        raise LineageError(f"version id {version_id!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', "
                           f"starting with a letter or digit, without '..'")
    return version_id


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in `path`; unreadable, malformed or non-object files raise LineageError naming it."""
    obj = paths.read_json(path, LineageError)
    if not isinstance(obj, dict):
        raise LineageError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def check_record(record: dict[str, Any], path: str, version_id: str) -> dict[str, Any]:
    """`record` if it holds every required field with the right type (and its id is its directory's name);
    otherwise LineageError naming the file, the field, the value found and what was expected."""
    for field, (kind, expected) in REQUIRED_FIELDS.items():
        if field not in record:
            raise LineageError(f"{path}: field {field!r} is missing (expected {expected})")
        value = record[field]
        if (not isinstance(value, kind) or (kind is int and isinstance(value, bool))
                or (kind is int and value < 0)):
            raise LineageError(f"{path}: field {field!r} is {_short(value)}, expected {expected}")
    for field, (kind, expected) in OPTIONAL_FIELDS.items():
        if field in record and not isinstance(record[field], kind):
            raise LineageError(f"{path}: field {field!r} is {_short(record[field])}, expected {expected}")
    if record["id"] != version_id:
        raise LineageError(f"{path}: field 'id' is {record['id']!r} but the record is in the directory of version "
                           f"{version_id!r}")
    bad = [p for p in record["parents"] if not isinstance(p, str) or not VERSION_ID.fullmatch(p) or ".." in p]
    if bad:
        raise LineageError(f"{path}: field 'parents' holds {_short(bad[0])}, expected {REQUIRED_FIELDS['parents'][1]}")
    return record


def cycle_through(start: str, parents_of: Callable[[str], list[str] | None]) -> list[str] | None:
    """The shortest loop of parent links from `start` back to itself (["a", "b", "a"]: a's parent is b, b's
    is a), or None. `parents_of` gives a version's parents, or None for a missing or unreadable one."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for parent in parents_of(node) or []:
            if parent == start:
                chain = [node]  # back along the links found, from node to start
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), start]
            if parent not in came_from:
                came_from[parent] = node
                queue.append(parent)
    return None


def first_cycle(starts: Iterable[str], parents_of: Callable[[str], list[str] | None]) -> list[str] | None:
    """A loop of parent links reachable from `starts` (["a", "b", "a"]), or None: one depth-first walk."""
    state: dict[str, int] = {}  # 1: on the current path, 2: every ancestor seen, no loop
    for root in starts:
        if root in state:
            continue
        path, todo = [root], [iter(parents_of(root) or [])]
        state[root] = 1
        while todo:
            parent = next(todo[-1], None)
            if parent is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(parent) == 1:
                return [*path[path.index(parent):], parent]
            elif parent not in state:
                state[parent] = 1
                path.append(parent)
                todo.append(iter(parents_of(parent) or []))
    return None


def graph_problems(version_id: str, ids: set[str], parents_of: Callable[[str], list[str] | None]) -> list[str]:
    """What is wrong with a version's place in the graph: parents not in the lineage, or a loop through it."""
    problems = [f"parent {p!r} is not in the lineage" for p in parents_of(version_id) or [] if p not in ids]
    cycle = cycle_through(version_id, parents_of)
    if cycle:
        problems.append(f"its parents loop back to it: {' -> '.join(cycle)}")
    return problems


def describe_cycle(cycle: list[str]) -> str:
    """One phrase for an error message."""
    return f"versions {' -> '.join(cycle)} form a loop of parent links (each names the next as a parent)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
