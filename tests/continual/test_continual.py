"""End to end: a base version on one domain, then an update on another with each strategy."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from tests_paths import ROOT, TINY

from lmadapt.config import load_config
from lmadapt.continual.average import interpolate
from lmadapt.lineage.store import Lineage
from lmadapt.train_step import final_params
from lmadapt.trainer import train

BOOKS = os.path.join(ROOT, "data", "books_en.txt.xz")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")

UPDATES = {
    "naive": [],
    "replay": ["data.replay.fraction=0.25", "data.replay.from_lineage=true"],
    "l2sp+ewc": ["continual.l2sp=0.1", "continual.ewc=1.0", "continual.fisher.compute=true",
                 "continual.fisher.gamma=0.5", "continual.fisher.batches=1"],
    # Levers that change nothing else's checks share one run (each run here costs a compile).
    "lwf+wsd+ema+wise": ["continual.distill.weight=0.5", "schedule.kind=wsd", "schedule.warmup_steps=1",
                         "schedule.rewarm_fraction=0.5", "schedule.carry=true", "continual.average.ema=0.5",
                         "continual.average.wise=0.5"],
    "freeze+carry": ["optimizer.groups=[{name: low, select: ['layers:0-0', embeddings], frozen: true}]",
                     "optimizer.carry_state=true"],
    "lora": ["continual.lora.rank=2"],
}


@pytest.mark.parametrize("name", list(UPDATES))
def test_update_on_a_new_domain(lineage_dir, data_cache, name):
    vid = f"v1-{name.replace('+', '-')}"
    cfg = load_config(TINY, [f"run.dir={lineage_dir / vid}", f"lineage.dir={lineage_dir / 'lineage'}",
                             f"version.id={vid}", "init.from_version=v0", "train.steps=4", "mesh.data=1",
                             "logging.progress=false", "eval.every=0", "checkpoint.every=0",
                             "data.sources=[{name: books, path: " + BOOKS + "}]", f"data.cache_dir={data_cache}",
                             *UPDATES[name]])
    lines = []
    result = train(cfg, log=lines.append, devices=jax.devices()[:1])
    assert result["version"] == vid and not result["interrupted"]
    lineage = Lineage(str(lineage_dir / "lineage"))
    rec = lineage.record(vid)
    assert rec["parents"] == ["v0"] and rec["steps"] == 4 and np.isfinite(rec["metrics"]["eval/loss"])
    kind = rec["strategy"]["kind"]
    if name == "naive":
        assert kind == "full" and set(rec["data"]["tokens_seen"]) == {"books"}
        sched = rec["strategy"]["schedule"]
        assert (sched["peak_lr"], sched["start"], sched["end"]) == (cfg.optimizer.lr, 0, 4)
    if name == "replay":
        # The parent's data comes back as the replay source, with its share of the batch.
        seen = rec["data"]["tokens_seen"]
        assert set(seen) == {"books", "shakespeare"} and kind == "replay"
        assert seen["shakespeare"] == 8 * 64  # 4 steps x 8 rows x 25% = 8 full rows of 64 tokens
        assert "eval/shakespeare/loss" in rec["metrics"]
    if name == "l2sp+ewc":
        assert kind == "l2sp+ewc" and rec["strategy"]["ewc"]["fisher_from"] == "v0"
        assert "fisher" in rec["artifacts"]  # online EWC: this version's Fisher includes 0.5 x v0's
        online = lineage.load_artifact(vid, "fisher")
        assert all(np.all(np.asarray(x) >= 0) for x in jax.tree.leaves(online))
    if name == "lwf+wsd+ema+wise":
        sched = rec["strategy"]["schedule"]
        assert kind == "distill+ema+wise" and sched["kind"] == "wsd"
        # rewarm_fraction and carry: half v0's peak, positions 4..8 after v0's 4 steps (from v0's record).
        assert sched["peak_lr"] == pytest.approx(0.5 * lineage.record("v0")["strategy"]["schedule"]["peak_lr"])
        assert (sched["start"], sched["end"]) == (4, 8)
        first = json.loads((lineage_dir / vid / "metrics.jsonl").read_text().splitlines()[0])
        assert first["train/lr"] == pytest.approx(sched["peak_lr"])  # v0 is past warmup: no re-warm
        # Published: halfway between the parent and the EMA; its metrics are of those params, not the trained ones.
        assert rec["strategy"]["average"] == {"wise": 0.5, "ema": 0.5}
        want = interpolate(lineage.load_params("v0"), jax.device_get(final_params(result["state"])), 0.5)
        for got, w in zip(jax.tree.leaves(lineage.load_params(vid)), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
        assert rec["metrics"]["eval/loss"] != result["eval_loss"]
    if name == "freeze+carry":
        assert kind == "freeze" and rec["strategy"]["optimizer_state"] == "carried"
        parent, child = lineage.load_params("v0"), lineage.load_params(vid)
        np.testing.assert_array_equal(np.asarray(child["embed"]["embedding"]), np.asarray(parent["embed"]["embedding"]))
        # The moments carry over, the schedule's step count does not: the applied learning rate follows this
        # run's schedule from its step 0 (carried, v0's count would have shifted it by v0's 4 steps).
        counts = [int(x.count) for x in jax.tree.leaves(result["state"].opt_state, is_leaf=lambda x: isinstance(
            x, optax.ScaleByScheduleState)) if isinstance(x, optax.ScaleByScheduleState)]
        assert counts and set(counts) == {4}
    if name == "lora":
        assert kind == "lora" and rec["artifacts"] == ["lora"]
        assert rec["strategy"]["trainable_params"] < rec["strategy"]["frozen_params"] / 10
    assert lineage.verify(vid) == []


def test_a_smaller_model_distils_from_a_version(lineage_dir, data_cache):
    """A fresh, smaller student (no init) learns from version v0 as its teacher: the teacher is loaded, the KL
    is reported and the record names the teacher's architecture."""
    cfg = load_config(TINY, [f"run.dir={lineage_dir / 'student'}", f"lineage.dir={lineage_dir / 'lineage'}",
                             "version.id=student", "train.steps=2", "mesh.data=1", "logging.progress=false",
                             "eval.every=0", "checkpoint.every=0", "logging.every=1", "model.d_model=32",
                             "model.d_ff=64", "continual.distill.weight=0.5", "continual.distill.teacher=v0",
                             "continual.distill.data_weight=0.5", f"data.sources.0.path={SHAKESPEARE}",
                             f"data.cache_dir={data_cache}"])
    assert train(cfg, log=lambda s: None, devices=jax.devices()[:1])["version"] == "student"
    lineage = Lineage(str(lineage_dir / "lineage"))
    rec = lineage.record("student")
    assert rec["parents"] == [] and rec["strategy"]["kind"] == "distill"
    assert rec["strategy"]["distill"]["teacher_model"]["d_model"] == lineage.model_config("v0").d_model == 64
    with open(lineage_dir / "student" / "metrics.jsonl", encoding="utf-8") as f:
        kls = [r["train/kl"] for r in map(json.loads, f) if "train/kl" in r]
    # A random student and a trained teacher disagree: the KL is positive, and finite.
    assert len(kls) == 2 and all(0 < k < 100 for k in kls)
