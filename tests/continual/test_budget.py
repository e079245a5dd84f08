"""The forgetting budget: the rule on synthetic rises, a run whose budget is always exceeded (the replay
fraction goes up at every eval point, the record says it did not hold), and a resume that is exact."""

import json
import os
import signal
import textwrap

import jax
import numpy as np
import pytest
from tests_paths import ROOT, TINY

from helpers import run_cmd
from lmadapt.config import BudgetConfig, ConfigError, load_config
from lmadapt.continual.budget import decide
from lmadapt.lineage.store import Lineage
from lmadapt.trainer import train

BOOKS = os.path.join(ROOT, "data", "books_en.txt.xz")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")
# Never met (no loss falls 10 nats): the fraction goes up at every eval point, to the cap.
BUDGET = ["continual.forgetting_budget.sources=[shakespeare]", "continual.forgetting_budget.max_rise=-10.0",
          "continual.forgetting_budget.replay_step=0.25", "continual.forgetting_budget.max_fraction=0.6"]


def test_the_rule_raises_caps_lowers_and_floors():
    cfg = BudgetConfig(sources=("a", "b"), max_rise=0.1, replay_step=0.1, max_fraction=0.5, slack=0.5)
    assert decide(0.2, {"a": 0.0, "b": 0.11}, cfg, 0.1) == 0.3  # one source over: up
    assert decide(0.45, {"a": 0.2, "b": 0.0}, cfg, 0.1) == 0.5  # capped at max_fraction
    assert decide(0.5, {"a": 0.2, "b": 0.3}, cfg, 0.1) == 0.5
    assert decide(0.3, {"a": 0.04, "b": -0.2}, cfg, 0.1) == 0.2  # all under slack * max_rise: down
    assert decide(0.15, {"a": 0.0, "b": 0.0}, cfg, 0.1) == 0.1  # not below the floor
    assert decide(0.3, {"a": 0.05, "b": 0.0}, cfg, 0.1) == 0.3  # between: unchanged
    assert decide(0.3, {"a": 0.1, "b": 0.0}, cfg, 0.1) == 0.3  # exactly at the budget is within it
    assert decide(0.3, {"a": float("nan"), "b": 0.0}, cfg, 0.1) == 0.4  # a non-finite loss counts as over
    assert decide(0.1, {"a": 0.0}, cfg, 0.1) == 0.1 and decide(0.0, {"a": 1.0}, cfg, 0.0) == 0.1


def child_overrides(root, cache, vid, *extra) -> list[str]:
    """An update of v0 (conftest) on books, replaying v0's Shakespeare (fraction 0 to start) under the budget."""
    return [f"run.dir={root / vid}", f"lineage.dir={root / 'lineage'}", f"version.id={vid}",
            "init.from_version=v0", "train.steps=6", "mesh.data=1", "logging.progress=false",
            "logging.every=2", "eval.every=2", "eval.batches=1", "checkpoint.every=2",
            "logging.tensorboard=false", "data.sources=[{name: books, path: " + BOOKS + "}]",
            f"data.cache_dir={cache}", "data.replay.from_lineage=true", *BUDGET, *extra]


def child(root, cache, vid, *extra):
    return load_config(TINY, child_overrides(root, cache, vid, *extra))


@pytest.fixture(scope="module")
def straight(lineage_dir, data_cache):
    lines = []
    result = train(child(lineage_dir, data_cache, "straight"), log=lines.append, devices=jax.devices()[:1])
    return result, lines


def test_an_exceeded_budget_raises_replay_at_each_eval_point_and_the_record_says_so(lineage_dir, straight):
    result, lines = straight
    assert result["version"] == "straight"
    entry = Lineage(str(lineage_dir / "lineage")).record("straight")["strategy"]["forgetting_budget"]
    assert entry["held"] is False and entry["exceeded"] == ["shakespeare"]
    assert "max_fraction=0.6" in entry["why"] and "shakespeare still rose" in entry["why"]
    assert entry["phases"] == [[0, 0.0], [2, 0.25], [4, 0.5], [6, 0.6]]
    assert [(d["step"], d["from"], d["to"], d["change"]) for d in entry["decisions"]] == \
        [(2, 0.0, 0.25, "up"), (4, 0.25, 0.5, "up"), (6, 0.5, 0.6, "up")]
    assert set(entry["baseline"]) == set(entry["final"]) == {"shakespeare"}
    rise = entry["final"]["shakespeare"] - entry["baseline"]["shakespeare"]
    assert entry["rises"]["shakespeare"] == pytest.approx(rise) and rise > -10.0
    # Each decision applies from the next step: 2 rows of 8 at steps 3-4 (batches 2, 3), 4 at steps 5-6.
    assert result["tokens_seen"]["shakespeare"] == (2 * 2 + 2 * 4) * 64
    assert result["data"]["replay_phases"] == entry["phases"]
    assert sum("forgetting budget at step" in line for line in lines) == 3
    with open(lineage_dir / "straight" / "metrics.jsonl", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if "budget/replay_fraction" in r]
    assert [(r["step"], r["budget/replay_fraction"]) for r in rows] == [(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.6)]
    assert "budget/shakespeare/baseline" in rows[0] and all("budget/shakespeare/rise" in r for r in rows[1:])


def test_a_run_killed_after_a_checkpoint_resumes_bit_identical(lineage_dir, data_cache, straight):
    """SIGKILL at step 5 (after the checkpoint at 4, whose meta holds the phase the decision at 4 started, or
    during its async save, when 2 is the newest): the restart recomputes the lost decisions, the same ones."""
    overrides = child_overrides(lineage_dir, data_cache, "resumed")
    script = textwrap.dedent(f"""
        import os, signal, jax
        from lmadapt.config import load_config
        from lmadapt.trainer import train
        cfg = load_config({json.dumps(TINY)}, {json.dumps(overrides)})
        train(cfg, on_step=lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == 5 else None,
              devices=jax.devices()[:1])
    """)
    killed = run_cmd(["-c", script])  # the test's own 8 fake devices, one used: the straight run's setup
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cfg = load_config(TINY, overrides)
    lines = []
    result = train(cfg, log=lines.append, devices=jax.devices()[:1])
    assert any("resumed from" in line for line in lines) and result["version"] == "resumed"
    for a, b in zip(jax.tree.leaves(straight[0]["state"].params), jax.tree.leaves(result["state"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lineage = Lineage(str(lineage_dir / "lineage"))
    first, again = lineage.record("straight"), lineage.record("resumed")
    assert first["params_hash"] == again["params_hash"]
    assert first["strategy"]["forgetting_budget"] == again["strategy"]["forgetting_budget"]
    assert first["data"]["tokens_seen"] == again["data"]["tokens_seen"]


def test_budget_sources_are_checked(lineage_dir, data_cache):
    # Known only once v0's sources are added (from_lineage): refused at session build, naming both.
    with pytest.raises(ConfigError, match=r"'poems' is not a replay source of this run \(replay sources: "
                                          r"shakespeare\)"):
        train(child(lineage_dir, data_cache, "bad", "continual.forgetting_budget.sources=[poems]"),
              log=lambda s: None, devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="eval.every"):
        child(lineage_dir, data_cache, "bad", "eval.every=0")
    with pytest.raises(ConfigError, match="final_fraction"):
        child(lineage_dir, data_cache, "bad", "data.replay.final_fraction=0.3")
