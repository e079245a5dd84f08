"""The one-writer lock: refusal names the holder, the kernel releases it when the holder dies, and a
lock path that is not a regular file is refused rather than followed."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from lmadapt.config import ConfigError
from lmadapt.files.locks import LockHeld, exclusive

HOLD = ("import sys; from lmadapt.files.locks import exclusive\n"
        "with exclusive(sys.argv[1], 'x'):\n print('held', flush=True)\n sys.stdin.read()")


def test_a_second_holder_is_refused_naming_the_first_until_it_dies(tmp_path):
    path = str(tmp_path / "train.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        named = rf"run.dir R is in use by pid {holder.pid} on host .* since .*; lock {path}"
        with pytest.raises(LockHeld, match=named), exclusive(path, "run.dir R"):
            pass
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock with the process
        holder.wait(timeout=30)
    finally:
        holder.kill()
    deadline = time.time() + 10
    while True:
        try:
            with exclusive(path, "run.dir R"):
                break
        except LockHeld:
            assert time.time() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = str(tmp_path / "train.lock")
    {"directory": os.mkdir, "fifo": os.mkfifo,
     "symlink": lambda p: os.symlink(str(tmp_path / "elsewhere"), p)}[kind](path)
    with pytest.raises(ConfigError, match=f"run.dir R: .*lock file {path}"), exclusive(path, "run.dir R"):
        pass
    assert not os.path.exists(tmp_path / "elsewhere")
