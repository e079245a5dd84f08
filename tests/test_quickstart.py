"""The quickstart main job (reduced steps) and eval.py over the versions it publishes."""

import csv
import json
import os

import numpy as np
from matplotlib import image

from helpers import run_cmd
from lmadapt.lineage.store import Lineage
from lmadapt.run.logs import read_metrics

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_quickstart_publishes_two_versions_and_eval_agrees(tmp_path):
    run, lin, cache = tmp_path / "qs", tmp_path / "qs" / "lineage", tmp_path / "cache"
    # Ten examples per capability task keep the test short; the table must still show each task's change.
    few = [f"eval.tasks.{i}.max_examples=10" for i in range(3)]
    common = [f"lineage.dir={lin}", f"data.cache_dir={cache}", "eval.batches=2", *few]
    result = run_cmd(["train.py", "train.steps=4", f"run.dir={run}", "logging.progress=false", *common],
                     env=ONE_DEVICE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lineage = Lineage(str(lin))
    assert lineage.ids() == ["base", "update"] and lineage.parents("update") == ["base"]
    rec = lineage.record("update")
    assert rec["strategy"]["kind"] == "replay" and set(rec["data"]["tokens_seen"]) == {"python_docs", "shakespeare"}
    assert "| shakespeare |" in result.stdout and "heatmap:" in result.stdout
    assert "| debian_section |" in result.stdout and "| python_docs_next_line |" in result.stdout
    heat = image.imread(run / "report" / "heatmap.png")
    assert heat.std() > 0.05  # a real picture, not a blank canvas

    # eval.py on the versions reproduces each run's own final held-out loss (same split, same batches).
    out = tmp_path / "eval"
    ev = run_cmd(["eval.py", "--lineage", str(lin), "--config", "configs/quickstart.yaml", "--out", str(out),
                  "--plot", "--prompt", "To be", "--max-new-tokens", "8", *common], env=ONE_DEVICE)
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["lm"]
    assert {(r["version"], r["dataset"]) for r in rows} == {(v, d) for v in ("base", "update")
                                                            for d in ("shakespeare", "python_docs")}
    for version, dataset in (("base", "shakespeare"), ("update", "python_docs"), ("update", "shakespeare")):
        logged = [r[f"eval/{dataset}/loss"] for r in read_metrics(str(run / version)) if f"eval/{dataset}/loss" in r]
        got = next(r for r in rows if r["version"] == version and r["dataset"] == dataset)
        np.testing.assert_allclose(got["loss"], logged[-1], rtol=1e-5)
        assert 0 < got["bits_per_byte"] < 16 and 0 <= got["token_accuracy"] <= 1
        np.testing.assert_allclose(got["perplexity"], np.exp(got["loss"]), rtol=1e-6)
    with open(out / "results.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| base | shakespeare |" in (out / "results.md").read_text()
    assert (out / "heatmap.png").stat().st_size > 5000 and "[update] 'To be' ->" in ev.stdout
    # The results are stored with each version, keyed by the dataset's fingerprint...
    stored = lineage.metrics("update")
    assert any(k.startswith("python_docs:") for k in stored)
    # ...and a second evaluation reuses them.
    again = run_cmd(["eval.py", "--lineage", str(lin), "--config", "configs/quickstart.yaml", "--out", str(out),
                     *common], env=ONE_DEVICE)
    assert again.returncode == 0 and "bits/byte" not in again.stdout


def test_eval_classification_and_errors(tmp_path):
    lin, cache = tmp_path / "lin", tmp_path / "cache"
    common = ["train.steps=2", "logging.progress=false", "mesh.data=1", "eval.every=0", "checkpoint.every=0",
              f"lineage.dir={lin}", f"data.cache_dir={cache}"]
    trained = run_cmd(["train.py", "--config", "configs/tiny.yaml", *common, f"run.dir={tmp_path / 'r'}",
                       "version.id=tiny"], env=ONE_DEVICE)
    assert trained.returncode == 0, trained.stderr[-2000:]
    labels = "[libs, libdevel, python, doc, perl, devel, utils, haskell, net, rust]"
    sections = ("data.sources=[{name: sections, kind: jsonl, path: data/debian_sections.jsonl.xz, "
                f"format: classification, labels: {labels}, template: 'Package: {{text}}\\nSection:'}}]")
    ev = run_cmd(["eval.py", "--lineage", str(lin), "--config", "configs/tiny.yaml", "--out", str(tmp_path / "o"),
                  "--max-examples", "20", sections, "data.val_fraction=0.01", f"data.cache_dir={cache}"],
                 env=ONE_DEVICE)
    assert ev.returncode == 0, ev.stderr[-3000:]
    (cls,) = json.loads((tmp_path / "o" / "results.json").read_text())["classification"]
    matrix = np.asarray(cls["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 20
    assert cls["accuracy"] == np.trace(matrix) / 20
    bad = run_cmd(["eval.py", "--lineage", str(lin), "--versions", "nope", "--config", "configs/tiny.yaml"],
                  env=ONE_DEVICE)
    assert bad.returncode == 2 and "no version 'nope'" in bad.stderr
    bad = run_cmd(["eval.py", "--lineage", str(lin), "--config", "configs/tiny.yaml", "--datasets", "books"],
                  env=ONE_DEVICE)
    assert bad.returncode == 2 and "--datasets: ['books'] are not sources of the config" in bad.stderr
    assert os.path.isdir(lin)
