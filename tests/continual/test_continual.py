"""End to end: a base version on one domain, then an update on another with each strategy."""

import json
import os

import jax
import numpy as np
import pytest
from tests_paths import ROOT, TINY

from lmadapt.config import load_config
from lmadapt.lineage.store import Lineage
from lmadapt.trainer import train

BOOKS = os.path.join(ROOT, "data", "books_en.txt.xz")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")

UPDATES = {
    "naive": [],
    "replay": ["data.replay.fraction=0.25", "data.replay.from_lineage=true"],
    "l2sp+ewc": ["continual.l2sp=0.1", "continual.ewc=1.0", "continual.fisher.compute=true",
                 "continual.fisher.gamma=0.5", "continual.fisher.batches=1"],
    "lwf+wsd": ["continual.distill.weight=0.5", "schedule.kind=wsd", "schedule.warmup_steps=1"],
    "freeze+carry": ["optimizer.groups=[{name: low, select: ['layers:0-0', embeddings], frozen: true}]",
                     "optimizer.carry_state=true"],
    "lora": ["continual.lora.rank=2"],
}


@pytest.fixture(scope="module")
def lineage_dir(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("continual")
    cfg = load_config(TINY, [f"run.dir={root / 'v0'}", f"lineage.dir={root / 'lineage'}", "version.id=v0",
                             "train.steps=4", "mesh.data=1", "logging.progress=false", "eval.every=0",
                             "checkpoint.every=0", f"data.sources.0.path={SHAKESPEARE}", f"data.cache_dir={data_cache}",
                             "continual.fisher.compute=true", "continual.fisher.batches=1",
                             "lineage.save_opt_state=true", "optimizer.groups=[{name: low, select: "
                             "['layers:0-0', embeddings], frozen: true}]"])
    train(cfg, log=lambda s: None, devices=jax.devices()[:1])
    return root


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
    if name == "lwf+wsd":
        assert kind == "distill" and rec["strategy"]["schedule"]["kind"] == "wsd"
    if name == "freeze+carry":
        assert kind == "freeze" and rec["strategy"]["optimizer_state"] == "carried"
        parent, child = lineage.load_params("v0"), lineage.load_params(vid)
        np.testing.assert_array_equal(np.asarray(child["embed"]["embedding"]), np.asarray(parent["embed"]["embedding"]))
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
