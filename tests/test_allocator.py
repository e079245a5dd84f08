"""The caching-allocator re-exec of the entry points (lmadapt/allocator.py)."""

import os
import subprocess
import sys

import pytest

from lmadapt import allocator
from tests.helpers import ROOT

PROBE = ("import sys; sys.path.insert(0, {root!r}); from lmadapt.allocator import reexec_with_fast_malloc, "
         "active_library; reexec_with_fast_malloc(); print(active_library() or 'glibc', sys.argv[1:])")


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LMADAPT_MALLOC_ACTIVE")}
    return subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), "a", "--b=1"], env={**full, **env},
                          capture_output=True, text=True, timeout=60)


def test_system_setting_keeps_glibc():
    assert allocator.find_library("system") is None
    out = _probe({"LMADAPT_MALLOC": "system"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "glibc"


def test_missing_library_is_named(tmp_path):
    missing = str(tmp_path / "libnope.so")
    with pytest.raises(FileNotFoundError, match="libnope.so"):
        allocator.find_library(missing)
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "LMADAPT_MALLOC": missing}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: LMADAPT_MALLOC={missing}: no such library (or use LMADAPT_MALLOC=system)"


def test_preload_env_prepends_and_configures_jemalloc():
    env = allocator.preload_env("/x/libjemalloc.so.2", {"LD_PRELOAD": "/y/other.so"})
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2:/y/other.so"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert "MALLOC_CONF" not in allocator.preload_env("/x/libtcmalloc_minimal.so.4", {})


@pytest.mark.skipif(allocator.find_library("") is None,
                    reason="no tcmalloc/jemalloc installed (apt install libtcmalloc-minimal4; .ci/run does)")
def test_reexec_runs_under_the_installed_allocator_with_the_same_arguments():
    library = allocator.find_library("")
    out = _probe({"LMADAPT_MALLOC": library})
    assert out.returncode == 0, out.stderr
    name, args = out.stdout.split(" ", 1)
    assert name in os.path.basename(library)
    assert args.strip() == "['a', '--b=1']"
