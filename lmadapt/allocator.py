"""Run the process under a caching malloc (tcmalloc or jemalloc) when one is installed.

XLA's CPU runtime allocates and frees large temporaries every step; with glibc malloc those pages go back
to the kernel and fault in again, which measured about a fifth of a training step on CPU (see
docs/performance.md). A caching allocator keeps them. The allocator must be chosen before the process
starts, so the entry points call `reexec_with_fast_malloc()` first thing: when a library is found and not
yet loaded it re-executes the same command (same pid, argv and environment) with `LD_PRELOAD` set.

`LMADAPT_MALLOC=system` turns this off; `LMADAPT_MALLOC=/path/to/lib.so` names a library. Only Linux.
"""

from __future__ import annotations

import os
import sys

# Debian/Ubuntu package names: libtcmalloc-minimal4, libjemalloc2.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)
# jemalloc returns freed pages to the OS after 10 s by default; for a training loop that is churn.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_MARKER = "LMADAPT_MALLOC_ACTIVE"


def find_library(setting: str | None = None) -> str | None:
    """The allocator library to preload: the `LMADAPT_MALLOC` setting if it is a path, None if it is
    "system", else the first installed candidate."""
    setting = os.environ.get("LMADAPT_MALLOC", "") if setting is None else setting
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    if setting:
        if not os.path.isfile(setting):
            raise FileNotFoundError(f"LMADAPT_MALLOC={setting}: no such library (or use LMADAPT_MALLOC=system)")
        return setting
    return next((path for path in CANDIDATES if os.path.isfile(path)), None)


def preload_env(library: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) that preloads `library` ahead of any existing LD_PRELOAD."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    if "jemalloc" in os.path.basename(library):
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_MARKER] = library
    return env


def active_library() -> str | None:
    """The preloaded allocator this process runs under, read from its own memory map; None for glibc."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc"):
        if name in maps:
            return name
    return None


def reexec_with_fast_malloc() -> None:
    """Re-execute this command under a caching allocator when one is installed and not already in use.

    Returns normally (changing nothing) when there is none, when it is switched off, or when this process
    already is the re-executed one.
    """
    if os.environ.get(_MARKER) or active_library():
        return
    library = find_library()
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(library))


def run_entry_point(main) -> None:
    """`sys.exit(main())` under a caching allocator: what an entry point's `__main__` block calls.

    A bad `LMADAPT_MALLOC` exits 2 with one line, as config errors do.
    """
    try:
        reexec_with_fast_malloc()  # before JAX loads: a caching malloc is worth ~1.5x on a CPU step
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
