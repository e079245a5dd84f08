"""Faults: preemption, crashes inside writes, concurrent publishers, corruption, untrusted files,
non-finite steps, full and read-only disks. Nothing published or completed may be lost."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import ROOT, TINY_MODEL, inject_fault, run_cmd, tiny_params, tmpfs
from lmadapt.checkpoint import Checkpointer
from lmadapt.config import CheckpointConfig, load_config
from lmadapt.data.tokenizers import ByteTokenizer
from lmadapt.lineage.store import Lineage, LineageError
from lmadapt.model import Transformer
from lmadapt.run.logs import read_metrics
from lmadapt.train_step import init_state

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def overrides(run_dir, steps=12, every=3):
    # The token cache sits beside the test's directory, off the small disks some tests mount.
    cache = os.path.join(os.path.dirname(os.path.dirname(str(run_dir))), "cache")
    return [f"run.dir={run_dir}", f"train.steps={steps}", f"checkpoint.every={every}", "eval.every=0",
            "logging.every=1", "logging.progress=false", "mesh.data=1", f"data.cache_dir={cache}"]


def train_cmd(run_dir, *extra, steps=12, every=3):
    return ["train.py", "--config", "configs/tiny.yaml", *overrides(run_dir, steps, every), *extra]


def final_state(run_dir):
    from lmadapt.session import build

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    session = build(cfg, devices=jax.devices()[:1])
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.checkpoint)
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, session.abstract_state)
    ckpt.close()
    return step, jax.device_get(state)


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def biggest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if "/d/" in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


# ---- 1. Preemption ------------------------------------------------------------------------------------------------

def start(cmd):
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env={**os.environ, **ONE_DEVICE, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_saves_a_checkpoint_and_exits_zero_and_eval_beside_it_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(train_cmd(run_dir, steps=10**6, every=2))  # an asynchronous save in flight most of the time
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "2").is_dir(), "the first checkpoint")
        # A reader beside the live run: read-only, so the run's in-flight saves are not cleaned away.
        scored = run_cmd(["eval.py", "--run", str(run_dir)], env=ONE_DEVICE)
        assert scored.returncode == 0 and json.loads(scored.stdout.splitlines()[-1])["step"] >= 2, scored.stderr
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"stopping on signal at step (\d+); checkpoint saved", out).group(1))
    assert took < 30 and 2 < stopped < 10**6
    ckpt = Checkpointer(str(run_dir / "checkpoints"), CheckpointConfig(), read_only=True)
    assert stopped in ckpt.all_steps() and all(ckpt.verify(s) == [] for s in ckpt.all_steps())  # all sealed
    steps = [r["step"] for r in read_metrics(str(run_dir)) if "train/loss" in r]
    assert steps == list(range(1, stopped + 1))


def test_sigkill_at_random_steps_then_restart_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = start(train_cmd(straight))
    # A second job on the same run.dir, once the first holds it: refused, naming the first; the first
    # ends bit-identical to the killed-and-restarted run below, so the second changed nothing.
    wait_for(lambda: (straight / "train.lock").is_file() and (straight / "train.lock").stat().st_size, "the lock")
    second = run_cmd(train_cmd(straight), env=ONE_DEVICE)
    assert second.returncode == 2 and f"is in use by pid {first.pid} on host" in one_error_line(second.stderr)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    # Two kills at seeded random steps of one run; the async saves every 3 steps mean some kills land
    # while a checkpoint is being written. Each restart resumes from the newest complete checkpoint.
    kills = sorted(np.random.default_rng(8).choice(np.arange(2, 12), size=2, replace=False).tolist())
    for k in kills:
        script = textwrap.dedent(f"""
            import os, signal
            from lmadapt.config import load_config
            from lmadapt.trainer import train
            cfg = load_config("configs/tiny.yaml", {json.dumps(overrides(resumed))})
            train(cfg, on_step=lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == {k} else None)
        """)
        killed = run_cmd(["-c", script], env=ONE_DEVICE)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = run_cmd(train_cmd(resumed), env=ONE_DEVICE)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]

    (step_a, a), (step_b, b) = final_state(str(straight)), final_state(str(resumed))
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    la = {r["step"]: r["train/loss"] for r in read_metrics(str(straight)) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in read_metrics(str(resumed)) if "train/loss" in r}
    assert all(la[s] == lb[s] for s in range(kills[-1] + 1, 13))


# ---- 2. Crashes inside writes -------------------------------------------------------------------------------------

# Counts Python calls into orbax/lmadapt (in every thread: saves finish in Orbax's background thread) and
# SIGKILLs the process at the call given as a fraction of a full write measured just before.
KILLER = textwrap.dedent("""
    import os, signal, sys, threading
    import jax, numpy as np
    from lmadapt.config import CheckpointConfig, ModelConfig, RopeScalingConfig
    from lmadapt.checkpoint import Checkpointer
    from lmadapt.lineage.store import Lineage
    from lmadapt.data.tokenizers import ByteTokenizer
    calls = [0, None]
    def prof(frame, event, arg):
        if event == "call" and ("orbax" in frame.f_code.co_filename or "lmadapt" in frame.f_code.co_filename):
            calls[0] += 1
            if calls[0] == calls[1]:
                os.kill(os.getpid(), signal.SIGKILL)
    def measured(write, kill_at=None):
        calls[:] = [0, kill_at]
        sys.setprofile(prof); threading.setprofile(prof)
        try:
            write()
        finally:
            sys.setprofile(None); threading.setprofile(None)
        return calls[0]
    def state(seed):
        rng = np.random.default_rng(seed)
        return {"w": jax.numpy.asarray(rng.normal(size=(64, 64)), jax.numpy.float32),
                "b": {"c": jax.numpy.asarray(rng.normal(size=(300,)), jax.numpy.float32)}}
""")


def abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.85])
def test_kill_inside_a_checkpoint_save_keeps_the_previous_one(tmp_path, fraction):
    d, scratch = tmp_path / "ckpt", tmp_path / "scratch"
    script = KILLER + textwrap.dedent(f"""
        cfg = CheckpointConfig(keep=5)
        ckpt, other = Checkpointer({str(d)!r}, cfg), Checkpointer({str(scratch)!r}, cfg)
        ckpt.save(1, state(1), {{"step": 1}}); ckpt.wait()
        other.save(1, state(1), {{"step": 1}}); other.wait()  # warm-up: later saves make the same calls
        total = measured(lambda: (other.save(2, state(2), {{"step": 2}}), other.wait()))
        measured(lambda: (ckpt.save(2, state(2), {{"step": 2}}), ckpt.wait()), int(total * {fraction}))
    """)
    result = run_cmd(["-c", script], env=ONE_DEVICE)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    ckpt = Checkpointer(str(d), CheckpointConfig(keep=5))  # a restart: partial writes are cleaned up
    assert not [n for n in os.listdir(d) if "tmp" in n]
    latest = ckpt.latest_step()
    assert latest in (1, 2) and ckpt.verify(1) == []
    if latest == 2:  # killed after the commit: restorable, at most not yet sealed
        assert ckpt.verify(2) in ([], ["MANIFEST.json: missing (the contents cannot be verified)"])
    rng = np.random.default_rng(latest)
    restored, meta = ckpt.restore(latest, abstract({"w": np.zeros((64, 64), np.float32),
                                                    "b": {"c": np.zeros((300,), np.float32)}}))
    np.testing.assert_array_equal(restored["w"], np.asarray(rng.normal(size=(64, 64)), np.float32))
    assert meta == {"step": latest}
    ckpt.save(3, restored, {"step": 3})  # the run goes on
    ckpt.close()
    assert Checkpointer(str(d), CheckpointConfig(keep=5)).verify(3) == []


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.85])
def test_kill_inside_a_publish_leaves_the_lineage_readable(tmp_path, fraction):
    lin, scratch = tmp_path / "lin", tmp_path / "scratch"
    script = KILLER + textwrap.dedent(f"""
        import flax.linen as nn
        from lmadapt.model import init_params
        cfg = ModelConfig(**{TINY_MODEL.__dict__!r})
        p = lambda seed: nn.unbox(init_params(cfg, jax.random.PRNGKey(seed)))
        lineage, other = Lineage({str(lin)!r}), Lineage({str(scratch)!r})
        lineage.publish("v0", p(0), cfg, ByteTokenizer(), parents=[])
        other.publish("v0", p(0), cfg, ByteTokenizer(), parents=[])
        total = measured(lambda: other.publish("v1", p(1), cfg, ByteTokenizer(), parents=["v0"]))
        measured(lambda: lineage.publish("v1", p(1), cfg, ByteTokenizer(), parents=["v0"]), int(total * {fraction}))
    """)
    result = run_cmd(["-c", script], env=ONE_DEVICE)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    lineage = Lineage(str(lin))
    assert lineage.ids() in (["v0"], ["v0", "v1"])  # never a half version
    assert all(lineage.verify(v) == [] for v in lineage.ids())
    if lineage.ids() == ["v0"]:
        lineage.publish("v1", tiny_params(1), TINY_MODEL, ByteTokenizer(), parents=["v0"])  # the crashed id is free
        assert lineage.verify("v1") == []
    assert os.listdir(lin / ".staging") == []  # the dead publisher's staging copy was removed


def test_two_processes_publishing_at_once(tmp_path):
    lin = tmp_path / "lin"
    script = textwrap.dedent("""
        import os, sys, time
        import flax.linen as nn, jax
        from lmadapt.config import ModelConfig, RopeScalingConfig
        from lmadapt.lineage.store import Lineage, LineageError
        from lmadapt.model import init_params
        from lmadapt.data.tokenizers import ByteTokenizer
        cfg = ModelConfig(**CFG)
        p = nn.unbox(init_params(cfg, jax.random.PRNGKey(int(sys.argv[2]))))
        while not os.path.exists(sys.argv[3]):  # start together
            time.sleep(0.01)
        try:
            Lineage(sys.argv[4]).publish(sys.argv[1], p, cfg, ByteTokenizer(), parents=[])
        except LineageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    """).replace("CFG", repr(TINY_MODEL.__dict__))
    go = tmp_path / "go"
    jobs = [("a", 1), ("b", 2), ("same", 3), ("same", 4)]
    procs = [subprocess.Popen([sys.executable, "-c", script, vid, str(seed), str(go), str(lin)], cwd=ROOT,
                              env={**os.environ, **ONE_DEVICE}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for vid, seed in jobs]
    time.sleep(3)  # let them all import and wait at the start line
    go.write_text("")
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert results[0][0] == results[1][0] == 0, results
    same = sorted(results[2:], key=lambda r: r[0])
    assert same[0][0] == 0 and same[1][0] == 2, same
    assert re.search(r"'same' (already exists|is being published to|was published to .* by another process)",
                     same[1][1]), same[1][1]
    lineage = Lineage(str(lin))
    assert sorted(lineage.ids()) == ["a", "b", "same"]
    assert all(lineage.verify(v) == [] for v in lineage.ids())


# ---- 3 and 7. Corruption and untrusted files ---------------------------------------------------------------------

def test_damaged_checkpoint_is_refused_naming_the_file_and_an_intact_one(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cmd(train_cmd(run_dir, steps=6), env=ONE_DEVICE).returncode == 0
    ckpts = run_dir / "checkpoints"
    victim = biggest_file(ckpts / "6")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    rel = os.path.relpath(victim, ckpts / "6")

    resumed = run_cmd(train_cmd(run_dir, steps=9), env=ONE_DEVICE)
    assert resumed.returncode == 1
    line = one_error_line(resumed.stderr)
    assert f"checkpoint {ckpts / '6'} is damaged: {rel}:" in line and "truncated" in line
    assert f"checkpoint 3 is intact: move {ckpts / '6'} out of {ckpts}" in line

    report = run_cmd(["tools/checkpoints.py", str(run_dir)])
    assert report.returncode == 1 and "3: intact" in report.stdout and "6: DAMAGED" in report.stdout
    assert rel in report.stdout

    # A flipped byte (same size) in checkpoint 3, and a pickle dropped into it, are named too.
    flip = biggest_file(ckpts / "3")
    raw = bytearray(read(flip))
    raw[len(raw) // 2] ^= 0x01
    write(flip, bytes(raw))
    (ckpts / "3" / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    problems = Checkpointer(str(ckpts), CheckpointConfig(), read_only=True).verify(3)
    assert f"{os.path.relpath(flip, ckpts / '3')}: contents changed" in " ".join(problems)
    assert "extra.pkl: a pickle file; pickle is never loaded, refused" in problems
    again = run_cmd(train_cmd(run_dir, steps=9), env=ONE_DEVICE)
    assert again.returncode == 1 and "no earlier checkpoint is intact" in one_error_line(again.stderr)


def test_damaged_or_untrusted_version_is_refused(tmp_path):
    lin = tmp_path / "lin"
    lineage = Lineage(str(lin))
    lineage.publish("v0", tiny_params(0), TINY_MODEL, ByteTokenizer(), parents=[])
    path = lineage.path("v0")
    victim = biggest_file(path)
    rel = os.path.relpath(victim, path)
    original = read(victim)

    write(victim, original[: len(original) // 3])
    with pytest.raises(LineageError, match=f"version 'v0' of lineage .* is damaged.*{re.escape(rel)}: .*truncated"):
        Lineage(str(lin)).load_params("v0")
    run = run_cmd(train_cmd(tmp_path / "run", f"lineage.dir={lin}", "init.from_version=v0", steps=2),
                  env=ONE_DEVICE)
    assert run.returncode == 2 and rel in one_error_line(run.stderr)
    assert not (tmp_path / "run" / "checkpoints").exists()
    out = run_cmd(["tools/lineage.py", "--dir", str(lin), "verify"])
    assert out.returncode == 1 and "v0: TAMPERED" in out.stdout and rel in out.stdout
    write(victim, original)
    assert Lineage(str(lin)).verify("v0") == []

    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the lineage")
    os.symlink(outside, os.path.join(path, "tokenizer.extra"))
    with pytest.raises(LineageError, match=f"tokenizer.extra: a symlink to {outside}, outside"):
        Lineage(str(lin)).load_params("v0")
    os.remove(os.path.join(path, "tokenizer.extra"))

    with open(os.path.join(path, "params", "state.pickle"), "wb") as f:
        f.write(b"\x80\x05\x95")
    with pytest.raises(LineageError, match="state.pickle: a pickle file; pickle is never loaded, refused"):
        Lineage(str(lin)).tokenizer("v0")


def test_no_code_path_loads_pickle_or_evaluates_text():
    banned = re.compile(r"\bpickle\.loads?\(|\btorch\.load\(|\bjoblib\.load\(|allow_pickle\s*=\s*True|"
                        r"(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\(|yaml\.unsafe_load|\bmarshal\.loads?\(")
    offenders = []
    for base in ("lmadapt", "tools", "train.py", "eval.py"):
        top = os.path.join(ROOT, base)
        paths = [os.path.join(r, f) for r, _, fs in os.walk(top) for f in fs if f.endswith(".py")] \
            if os.path.isdir(top) else [top]
        for p in paths:
            for i, line in enumerate(read(p).decode().splitlines(), 1):
                # np.load must always be told not to unpickle object arrays.
                if banned.search(line) or ("np.load(" in line and "allow_pickle=False" not in line):
                    offenders.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
    assert offenders == []


# ---- 4. Numerical faults ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [False, True], ids=["nan-gradient", "nan-loss"])
def test_a_non_finite_step_changes_nothing_and_is_counted(value, monkeypatch):
    import lmadapt.train_step as ts

    monkeypatch.setattr(ts, "forward", ts.forward)  # restored after the test
    model, tx = Transformer(TINY_MODEL), optax.adam(1e-3)
    state = init_state(jax.random.PRNGKey(0), model, tx, seq_len=16)
    tokens = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
    batch = {"tokens": tokens, "targets": tokens, "positions": tokens, "segment_ids": jnp.ones_like(tokens),
             "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    leaf = "['layers_1']['mlp']['up']['kernel']"
    faulty = inject_fault(leaf, 1, value)
    step = jax.jit(lambda s, b: faulty(s, b, model=model, tx=tx, schedule=optax.constant_schedule(1e-3)))
    s1, m1 = step(state, batch)
    assert int(m1["skipped"]) == 0 and not np.any(m1["nonfinite_leaves"])
    s2, m2 = step(s1, batch)  # the poisoned step
    assert int(s2.step) == 2 and int(s2.skipped) == 1 and int(m2["skipped"]) == 1
    for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state)), jax.tree.leaves((s2.params, s2.opt_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(s1.params)[0]]
    flagged = [p for p, bad in zip(paths, np.asarray(m2["nonfinite_leaves"]), strict=True) if bad]
    if value:
        assert not np.isfinite(m2["loss"]) and len(flagged) > 1  # a NaN forward poisons every gradient
    else:
        assert np.isfinite(m2["loss"]) and flagged == [leaf]
    s3, m3 = step(s2, batch)
    assert int(m3["skipped"]) == 1 and np.isfinite(m3["loss"])  # training goes on from the intact state


NAN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import lmadapt.session, train
    from helpers import inject_fault
    # Step 5 (taken from state.step 4) gets a NaN gradient in one MLP kernel.
    lmadapt.session.train_step = inject_fault("['layers_0']['mlp']['up']['kernel']", 4)
    sys.exit(train.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_policy_in_a_run(tmp_path, policy):
    cfg = tmp_path / "groups.yaml"
    cfg.write_text(f"base: {ROOT}/configs/tiny.yaml\noptimizer:\n  groups:\n"
                   "    - {name: attn, select: [attention]}\n    - {name: mlp, select: [mlp]}\n")
    run_dir = tmp_path / "run"
    args = ["--config", str(cfg), *overrides(run_dir, steps=8, every=3), f"train.on_nonfinite={policy}"]
    result = run_cmd(["-c", NAN_SCRIPT, *args], env=ONE_DEVICE)
    where = "step 5: loss [0-9.]+, non-finite gradients in group 'mlp' first \\(layers_0/mlp/up/kernel; 1 leaves"
    rows = {r["step"]: r for r in read_metrics(str(run_dir)) if "train/loss" in r}
    ckpt = Checkpointer(str(run_dir / "checkpoints"), CheckpointConfig(), read_only=True)
    if policy == "skip":
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.search(where + r".*the update was not applied, skipped \(1 so far\)", result.stdout)
        assert [rows[s]["train/skipped"] for s in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert ckpt.all_steps() == [3, 6, 8]
    else:
        assert result.returncode == 1
        assert re.search(where + r".*\(train.on_nonfinite=stop\); checkpoints up to here are intact",
                         one_error_line(result.stderr))
        assert max(rows) == 5 and ckpt.all_steps() == [3]
    assert all(ckpt.verify(s) == [] for s in ckpt.all_steps())


# ---- 5. Full or read-only disks -----------------------------------------------------------------------------------

def test_read_only_or_too_small_run_dir_fails_before_training(tmp_path):
    with tmpfs(tmp_path / "ro", "4m", read_only=True) as ro:
        result = run_cmd(train_cmd(ro / "run"), env=ONE_DEVICE)
        assert result.returncode == 2
        assert f"run.dir: {ro / 'run'} is not writable (Read-only file system)" in one_error_line(result.stderr)
        assert os.listdir(ro) == []
    with tmpfs(tmp_path / "small", "256k") as small:
        result = run_cmd(train_cmd(small / "run"), env=ONE_DEVICE)
        assert result.returncode == 2
        assert re.search(r"run.dir: .* MiB free, but one checkpoint of this state needs about .* MiB",
                         one_error_line(result.stderr))


def test_disk_filling_up_mid_run_stops_cleanly_keeping_the_last_checkpoint(tmp_path):
    with tmpfs(tmp_path / "disk", "3m") as disk:  # room for two checkpoints of the tiny model, not three
        run_dir = disk / "run"
        result = run_cmd(train_cmd(run_dir, steps=30), env=ONE_DEVICE)
        assert result.returncode == 1
        line = one_error_line(result.stderr)
        ckpts = run_dir / "checkpoints"
        assert re.search(r"saving a checkpoint in .* failed \(no space left on device\); the last complete "
                         r"checkpoint is .*/checkpoints/(\d+)$", line), line
        last = int(line.rsplit("/", 1)[1])
        ckpt = Checkpointer(str(ckpts), CheckpointConfig(), read_only=True)
        assert ckpt.latest_step() == last and ckpt.verify(last) == []
        assert not [n for n in os.listdir(ckpts) if "tmp" in n]  # the partial save gave its space back
