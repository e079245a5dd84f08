"""Two local processes (jax.distributed on 127.0.0.1, CPU collectives) train like one process."""

import lzma
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from helpers import ROOT, run_cmd
from lmadapt.run.logs import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(run_dir):
    return ["--config", "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=3", "mesh.data=2", "mesh.fsdp=4",
            "mesh.tensor=1", "logging.every=1", "logging.progress=false", "eval.every=3", "checkpoint.every=0",
            f"data.cache_dir={run_dir.parent / 'cache'}"]


class Pair:
    """train.py as processes 0 and 1 of a 2-process job on 127.0.0.1 (4 fake CPU devices each).

    Output goes to files, not pipes: a pipe nobody reads while the test polls would fill and block the
    process writing to it.
    """

    def __init__(self, args: list[str], logs) -> None:
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        logs.mkdir(parents=True, exist_ok=True)
        self.paths = [(logs / f"{i}.out", logs / f"{i}.err") for i in range(2)]
        self.procs = []
        for i, (out, err) in enumerate(self.paths):
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "train.py", *args, "distributed.mode=on",
                     f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                     f"distributed.process_id={i}", "distributed.initialization_timeout=60"],
                    cwd=ROOT, env=env, stdout=fo, stderr=fe))

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of both processes; kill them all if that takes longer than `timeout` in all."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def out(self, i: int) -> str:
        return self.paths[i][0].read_text()

    def err(self, i: int) -> str:
        return self.paths[i][1].read_text()


def test_pair_matches_one_process_and_resumes_after_a_peer_is_killed(tmp_path):
    """The pair trains exactly like one process on the same 8 devices, each process reading its half of the corpus
    (data.readers=2). Issue 8: a process of the pair killed
    mid-run makes the other exit promptly (exit 3) with one clear line instead of waiting on the dead peer;
    the restarted pair resumes from the last checkpoint and retraces the interrupted run's losses exactly.
    (One test: every pair start-up costs two JAX imports and compilations on the 2 CI cores.)"""
    run = tmp_path / "run"
    # Issue 20: the corpus in 4 files read by 2 readers, so each process of the pair reads only its files.
    with lzma.open(os.path.join(ROOT, "data", "shakespeare.txt.xz"), "rt", encoding="utf-8") as f:
        text = f.read().split("\n")
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("\n".join(text[i::4]), encoding="utf-8")
    args = [*common(run), "train.steps=8", "checkpoint.every=4", "eval.every=0", "distributed.heartbeat_timeout=10",
            f"data.sources.0.path={tmp_path / 'corpus'}", "data.readers=2"]
    single = run_cmd(["train.py", *[a.replace(f"run.dir={run}", f"run.dir={tmp_path / 'single'}") for a in args]],
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert single.returncode == 0, single.stderr[-3000:]
    ref = {r["step"]: r["train/loss"] for r in read_metrics(str(tmp_path / "single")) if "train/loss" in r}
    assert sorted(ref) == list(range(1, 9))

    def train_rows() -> list[dict]:
        return [r for r in read_metrics(str(run)) if "train/loss" in r]

    pair = Pair(args, tmp_path / "first")
    try:
        # Past the checkpoint at step 4 (its async save committed) and before the last one, at step 8,
        # so the resumed pair retraces some of the logged steps.
        deadline = time.monotonic() + 120  # start-up and compilation of the pair on 2 shared cores
        while max((r["step"] for r in train_rows()), default=0) < 6:
            if time.monotonic() > deadline or any(p.poll() is not None for p in pair.procs):
                pair.kill()
                raise AssertionError(f"the pair did not reach step 6:\n{pair.err(0)[-3000:]}")
            time.sleep(0.05)
        pair.procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # The survivor's next collective fails at once; at worst JAX's heartbeat timeout (10 s) ends it.
        code = pair.procs[0].wait(timeout=40)
        waited = time.monotonic() - killed_at
    finally:
        pair.kill()
    assert "devices=8 processes=2" in pair.out(0)
    err = pair.err(0)
    assert code == 3, err[-3000:]
    assert waited < 30, waited
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2 stopped:") and "another process died" in last, err[-3000:]
    assert "Restart all processes on the same run.dir" in last
    before = {r["step"]: r["train/loss"] for r in train_rows()}
    n_before = len(train_rows())

    pair = Pair(args, tmp_path / "second")
    codes = pair.wait(timeout=180)
    for i, c in enumerate(codes):
        assert c == 0, pair.err(i)[-3000:]
    resumed = re.search(r"resumed from \S*checkpoints[/\\](\d+)", pair.out(0))
    assert resumed, pair.out(0)[-3000:]
    start = int(resumed.group(1))
    after = {r["step"]: r["train/loss"] for r in train_rows()[n_before:]}  # what the restarted pair logged
    assert sorted(after) == list(range(start + 1, 9))
    # The steps the first run logged after its last complete checkpoint were trained again: same losses.
    redone = sorted(set(after) & set(before))
    assert 4 <= start < max(before) and redone, (start, sorted(before))
    np.testing.assert_allclose([after[s] for s in redone], [before[s] for s in redone], rtol=1e-5)
    # Both runs of the pair trained what one process trains.
    for logged in (before, after):
        np.testing.assert_allclose([logged[s] for s in sorted(logged)], [ref[s] for s in sorted(logged)], rtol=1e-5)
    # Both processes wrote their shards of each checkpoint into the one shared directory.
    assert sorted(os.listdir(run / "checkpoints"), key=int)[-1] == "8"
