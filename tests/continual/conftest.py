"""Shared by the continual tests: one parent version for the whole session (each training run costs a compile)."""

import os

import jax
import pytest
from tests_paths import ROOT, TINY

from lmadapt.config import load_config
from lmadapt.trainer import train

SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")


@pytest.fixture(scope="session")
def lineage_dir(tmp_path_factory, data_cache):
    """Version v0 in `<dir>/lineage`: the tiny model trained 4 steps on Shakespeare, with a Fisher, its optimizer
    state and a frozen group (what the updates in this package start from; each publishes its own ids)."""
    root = tmp_path_factory.mktemp("continual")
    cfg = load_config(TINY, [f"run.dir={root / 'v0'}", f"lineage.dir={root / 'lineage'}", "version.id=v0",
                             "train.steps=4", "mesh.data=1", "logging.progress=false", "eval.every=0",
                             "checkpoint.every=0", f"data.sources.0.path={SHAKESPEARE}", f"data.cache_dir={data_cache}",
                             "continual.fisher.compute=true", "continual.fisher.batches=1",
                             "lineage.save_opt_state=true", "optimizer.groups=[{name: low, select: "
                             "['layers:0-0', embeddings], frozen: true}]"])
    train(cfg, log=lambda s: None, devices=jax.devices()[:1])
    return root
