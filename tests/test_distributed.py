"""Two local processes (jax.distributed on 127.0.0.1, CPU collectives) train like one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from helpers import ROOT, run_cmd
from lmadapt.logs import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(run_dir):
    return ["--config", "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=3", "mesh.data=2", "mesh.fsdp=4",
            "mesh.tensor=1", "logging.every=1", "logging.progress=false", "eval.every=3", "checkpoint.every=0",
            f"data.cache_dir={run_dir.parent / 'cache'}"]


def losses(run_dir):
    return [r["train/loss"] for r in read_metrics(str(run_dir)) if "train/loss" in r]


def test_two_processes_match_one(tmp_path):
    single = run_cmd(["train.py", *common(tmp_path / "single")],
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [sys.executable, "train.py", *common(tmp_path / "multi"), "distributed.mode=on",
             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
             f"distributed.process_id={i}", "distributed.initialization_timeout=60"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    assert "devices=8 processes=2" in outs[0][1]
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(ref) == len(got) == 3
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # Both processes wrote their shards of the final checkpoint into the one shared directory.
    assert os.listdir(tmp_path / "multi" / "checkpoints") == ["3"]
