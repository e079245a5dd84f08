"""Resuming a run: only from a checkpoint whose contents check out, restoring finite values, under the
config it was trained with; one job per run directory; readers of a live run never write to it."""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT, assert_one_line, call, run_cmd, snapshot
from lmadapt.checkpoint import Checkpointer
from lmadapt.config import CheckpointConfig, load_config
from lmadapt.files import locks
from lmadapt.session import build
from lmadapt.trainer import RUN_LOCK

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the repository root's train.py)

_spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")


def argv(run_dir, cache, *extra, steps=6):
    return ["--config", TINY, f"run.dir={run_dir}", f"data.cache_dir={cache}", f"data.sources.0.path={SHAKESPEARE}",
            f"train.steps={steps}", "checkpoint.every=3", "eval.every=0", "logging.every=3", "logging.progress=false",
            *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_cache):
    """A tiny run trained to step 6 with sealed checkpoints at 3 and 6 (copied by each test)."""
    run_dir = str(tmp_path_factory.mktemp("resume") / "run")
    rc, err = call(train.main, argv(run_dir, data_cache))
    assert rc == 0, err
    return run_dir


@pytest.fixture
def run(finished, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(finished, copy)
    return copy


def unchanged(run_dir):
    """Everything under `run_dir` but the lock file, whose holder record each job rewrites."""
    return {k: v for k, v in snapshot(run_dir).items() if not k.endswith(RUN_LOCK)}


def refused(run_dir, cache, rc_wanted, *extra, needles=(), steps=9):
    """train.py on `run_dir` exits `rc_wanted` with one error line holding `needles`, writing nothing."""
    before = unchanged(run_dir)
    rc, err = call(train.main, argv(run_dir, cache, *extra, steps=steps))
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == rc_wanted and len(lines) == 1, err[-2000:]
    assert_one_line(lines[0], *needles)
    assert unchanged(run_dir) == before
    return lines[0]


def test_checkpoint_without_a_commit_record_is_refused_naming_the_intact_one(run, data_cache):
    os.makedirs(os.path.join(run, "checkpoints", "99"))  # an empty step directory, as a bad copy leaves
    refused(run, data_cache, 1, needles=("checkpoints/99 is damaged", "no MANIFEST.json", "_CHECKPOINT_METADATA",
                                         "checkpoint 6 is intact"))
    shutil.rmtree(os.path.join(run, "checkpoints", "99"))
    manifest = os.path.join(run, "checkpoints", "6", "MANIFEST.json")
    os.remove(manifest)
    os.mkfifo(manifest)  # never opened: reading it would block the restart
    refused(run, data_cache, 1, needles=("checkpoints/6 is damaged", "named pipe", "checkpoint 3 is intact"))
    os.remove(manifest)
    with open(os.path.join(run, "checkpoints", "9"), "w") as f:  # a user's file where a save would go
        f.write("mine")
    refused(run, data_cache, 2, needles=("checkpoints/9 is a file, not a checkpoint directory", "move it out"))


def test_unsealed_checkpoint_is_resumed_only_if_it_restores_finite(run, data_cache):
    cfg = load_config(os.path.join(run, "config.yaml"))
    session = build(cfg, devices=jax.devices()[:1])
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), CheckpointConfig(async_save=False))
    state, meta = ckpt.restore(6, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                               session.abstract_state))
    # A chunk TensorStore cannot find comes back as zeros: finite, but not what was saved (meta's digest).
    zeroed = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
    bad = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params))
    for step, damaged in ((7, zeroed), (8, bad)):
        ckpt.save(step, damaged, meta)
        os.remove(os.path.join(run, "checkpoints", str(step), "MANIFEST.json"))  # as if killed before the seal
    ckpt.close()
    refused(run, data_cache, 1, needles=("checkpoints/8 restores non-finite values in params/",
                                         "checkpoint 6 is intact"))
    shutil.rmtree(os.path.join(run, "checkpoints", "8"))
    line = refused(run, data_cache, 1, needles=("checkpoints/7 restores params/", "other than it was saved",
                                                "checkpoint 6 is intact"))
    assert "move " in line and "restart to resume from step 6" in line

    shutil.rmtree(os.path.join(run, "checkpoints", "7"))
    os.remove(os.path.join(run, "checkpoints", "6", "MANIFEST.json"))
    rc, err = call(train.main, argv(run, data_cache, steps=9))
    assert rc == 0, err


def test_resume_refuses_a_changed_config_listing_the_keys(run, data_cache):
    with open(os.path.join(run, "config.yaml"), "rb") as f:
        config_yaml = f.read()
    refused(run, data_cache, 2, "model.d_model=32",
            needles=("the config differs from the one checkpoint 6 was trained with", "model.d_model: 64 -> 32",
                     "model and tokenizer keys cannot change on resume"))
    line = refused(run, data_cache, 2, "optimizer.lr=0.01", "data.seed=5", "train.seq_len=32",
                   needles=("data.seed: 0 -> 5", "optimizer.lr: 0.003 -> 0.01", "train.seq_len: 64 -> 32"))
    assert line.endswith("--allow-config-change data.seed,optimizer.lr,train.seq_len")
    refused(run, data_cache, 2, "model.d_model=32", "--allow-config-change", "model.d_model",
            needles=("--allow-config-change model.d_model", "cannot change on resume"))
    other = os.path.join(os.path.dirname(run), "other.txt")  # the same source name, other contents
    with open(other, "w", encoding="utf-8") as f:
        f.write("".join(f"line {i} of another corpus\n" for i in range(3000)))
    refused(run, data_cache, 2, f"data.sources.0.path={other}", "--allow-config-change", "data.sources.0.path",
            needles=("what data source(s) shakespeare read differs from what checkpoint 6 was trained on",
                     "--allow-config-change data.sources"))
    with open(os.path.join(run, "config.yaml"), "rb") as f:
        assert f.read() == config_yaml

    # Runtime keys and train.steps upward go through; a key the user names is allowed. All are recorded.
    rc, err = call(train.main, argv(run, data_cache, "optimizer.lr=0.01", "eval.every=3", "--allow-config-change",
                                    "optimizer.lr", steps=9))
    assert rc == 0, err
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), CheckpointConfig(), read_only=True)
    changes = {c["key"]: (c["step"], c["from"], c["to"]) for c in ckpt.read_meta(9)["config_changes"]}
    assert changes.pop("run.dir")[2] == json.dumps(run)[:57] + "..."  # this test's copy of the run was moved
    assert changes == {"optimizer.lr": (6, "0.003", "0.01"), "eval.every": (6, "0", "3"), "train.steps": (6, "6", "9")}
    refused(run, data_cache, 2, steps=12, needles=("optimizer.lr: 0.01 -> 0.003",))  # the new value now holds


def test_a_second_job_on_a_run_dir_is_refused_naming_the_holder(run, data_cache):
    with locks.exclusive(os.path.join(run, RUN_LOCK), "test"):
        line = refused(run, data_cache, 2, needles=(f"run.dir {run} is in use by pid {os.getpid()}",
                                                   f"lock {run}/{RUN_LOCK}"))
    assert "another directory" in line  # (release with the holder's death: tests/run/test_locks.py)


def test_eval_run_reads_without_writing(run, data_cache):
    tmp = os.path.join(run, "checkpoints", "8.orbax-checkpoint-tmp-1234")  # a live run's save in flight
    os.makedirs(tmp)
    before = snapshot(run)
    out_rc, err = call(eval_cli.main, ["--run", run, f"data.cache_dir={data_cache}"])
    assert out_rc == 0, err
    assert snapshot(run) == before
    os.makedirs(os.path.join(run, "checkpoints", "9"))
    rc, err = call(eval_cli.main, ["--run", run, f"data.cache_dir={data_cache}"])
    assert rc == 2
    assert_one_line(err.strip(), "error: checkpoint", "checkpoints/9 is damaged", "_CHECKPOINT_METADATA")


SIGNAL_IN_START_UP = """
import os, signal, sys
import lmadapt.trainer as trainer
real = trainer.resolve_origin
def preempted(cfg, **kw):
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler preempts the job while it is still starting
    return real(cfg, **kw)
trainer.resolve_origin = preempted
sys.path.insert(0, os.getcwd())
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_during_start_up_exits_zero_having_trained_nothing(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    result = run_cmd(["-c", SIGNAL_IN_START_UP, *argv(run_dir, data_cache)],
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopping on SIGTERM during start-up, before the first step" in result.stdout
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, RUN_LOCK), encoding="utf-8") as f:  # the holder, kept for the next refusal
        assert json.load(f)["pid"] > 0


def test_starting_from_a_version_with_non_finite_params_is_refused(finished, tmp_path, data_cache):
    from lmadapt.data.tokenizers import ByteTokenizer
    from lmadapt.lineage.store import Lineage

    cfg = load_config(os.path.join(finished, "config.yaml"))
    session = build(cfg, devices=jax.devices()[:1])
    ckpt = Checkpointer(os.path.join(finished, "checkpoints"), CheckpointConfig(), read_only=True)
    state, _ = ckpt.restore(6, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), session.abstract_state))
    ckpt.close()
    params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state.params)
    lineage = str(tmp_path / "lineage")
    Lineage(lineage).publish("bad", params, cfg.model, ByteTokenizer(), parents=[])
    run_dir = str(tmp_path / "run")
    rc, err = call(train.main, argv(run_dir, data_cache, f"lineage.dir={lineage}", "init.from_version=bad"))
    assert rc == 2
    assert_one_line(err.strip().splitlines()[-1], "error: ", "'bad'", "has non-finite values in params/",
                    "not training from it")
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "3"))


def test_a_lineage_dir_without_room_for_one_version_is_refused_before_training(tmp_path, data_cache):
    from helpers import tmpfs

    with tmpfs(tmp_path / "small", "64k") as small:  # the tiny model's params are about 460 KiB
        run_dir = str(tmp_path / "run")
        rc, err = call(train.main, argv(run_dir, data_cache, f"lineage.dir={small}/lin", "version.id=v"))
        assert rc == 2
        assert_one_line(err.strip().splitlines()[-1], f"error: lineage.dir: {small}/lin has", "MiB free, but one "
                        "version of these params needs about")
        assert os.listdir(small) == [] and not os.path.exists(run_dir)
