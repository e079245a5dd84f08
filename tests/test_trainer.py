"""The launcher end to end: runs, logs, checkpoints and evaluates (faults and resume: test_faults.py)."""

import json
import os

import numpy as np

from helpers import run_cmd
from lmadapt.run.logs import read_metrics

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def overrides(run_dir, steps=12):
    return [f"run.dir={run_dir}", f"train.steps={steps}", "checkpoint.every=3", "eval.every=6", "logging.every=1",
            "logging.progress=false", "mesh.data=1", f"data.cache_dir={os.path.dirname(run_dir)}/cache"]


def test_train_py_runs_logs_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cmd(["train.py", "--config", "configs/tiny.yaml", *overrides(run_dir, steps=6)], env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(str(run_dir))
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 7))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any("eval/loss" in r for r in rows)
    assert sorted(os.listdir(run_dir / "checkpoints")) >= ["3", "6"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tb"))
    assert (run_dir / "tokenizer.bytes").is_file()  # the run carries its tokenizer
    assert any("data/shakespeare_tokens" in r for r in rows) and any("eval/shakespeare/loss" in r for r in rows)

    # eval.py on the final checkpoint reproduces the loop's own final eval loss.
    loop_eval = [r["eval/loss"] for r in rows if "eval/loss" in r and r["step"] == 6]
    out = run_cmd(["eval.py", "--run", str(run_dir)], env=ONE_DEVICE)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 6
    np.testing.assert_allclose(result["loss"], loop_eval[0], rtol=1e-6)
    np.testing.assert_allclose(result["sources"]["shakespeare"]["loss"], loop_eval[0], rtol=1e-6)
    missing = run_cmd(["eval.py", "--run", str(run_dir), "--step", "4"], env=ONE_DEVICE)
    assert missing.returncode == 2 and "no checkpoint at step 4" in missing.stderr
