"""data.readers: a corpus read in parts, each process reading only the files of its rows, batches unchanged."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
from test_pipeline import data_config, source, write_corpus

from helpers import ROOT
from lmadapt.config import TokenizerConfig
from lmadapt.data.pipeline import build_pipeline

B, T = 8, 32


def corpus(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(5):
        write_corpus(tmp_path / "c" / f"f{i}.txt", 60 + 10 * i, i)
    write_corpus(tmp_path / "small.txt", 200, 9)  # one file: every reader reads it whole
    for f in [*(tmp_path / "c").iterdir(), tmp_path / "small.txt"]:
        os.utime(f, (1e9, 1e9))  # not written just now: their hashes are remembered (DigestMemo.RACY_S)
    return data_config(tmp_path, [source("a", tmp_path / "c", weight=3.0), source("b", tmp_path / "small.txt")])


def build(cfg, readers):
    return build_pipeline(dataclasses.replace(cfg, readers=readers), TokenizerConfig(kind="bytes"), B, T)


def pieces(rows):
    """The text of every piece of every row (the byte tokenizer: ids are bytes), but the short ones (the end of a
    long document, which two documents can share)."""
    return {bytes(np.asarray(rows.tokens[s:s + n + 1], np.uint8).tolist()) for r in range(rows.n_rows)
            for s, n in rows.row_pieces(r) if n >= 16}


def test_readers_keep_the_pipelines_guarantees(tmp_path):
    cfg = corpus(tmp_path)
    one, two = build(cfg, 1), build(cfg, 2)
    assert two.describe()["readers"] == 2 and two.sources["a"]["readers"] == "split"
    assert two.sources["b"]["readers"] == "replicated"
    again = build(cfg, 2)  # another process, or a resumed run
    for step in (0, 3, 41):
        full = two.batch(step)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([again.batch(step, slice(0, 4))[k],
                                                          again.batch(step, slice(4, 8))[k]]), full[k])
        for reader in two.readers:  # each source's share of each block: its weight to within one row
            counts = reader.source_counts(step)
            assert abs(counts["a"] - 0.75 * 4) < 1 and abs(counts["b"] - 0.25 * 4) < 1
    steps = 30
    seen = sum(two.batch(s)["loss_mask"].sum() for s in range(steps))
    assert seen == sum(two.tokens_seen(steps).values())
    # Held out: the documents a one-reader run holds out, never trained on by any reader.
    for name in ("a", "b"):
        held = set().union(*(pieces(r.val[name]) for r in two.readers))
        trained = set().union(*(pieces(c.rows) for r in two.readers for c in r.components if c.name == name))
        assert held == pieces(one.val[name]) and not held & trained
        assert trained == {p for c in one.components if c.name == name for p in pieces(c.rows)}
    assert two.val_batches("b", 100) == one.val_batches("b", 100)
    np.testing.assert_array_equal(two.val_batch("b", 1)["tokens"], one.val_batch("b", 1)["tokens"])


PROCESS = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import dataclasses
from lmadapt.config import TokenizerConfig
from lmadapt.data.pipeline import build_pipeline
from test_pipeline import data_config, source
from pathlib import Path
tmp, p = Path(sys.argv[1]), int(sys.argv[2])
cfg = data_config(tmp, [source("a", tmp / "c", weight=3.0), source("b", tmp / "small.txt")])
pipe = build_pipeline(dataclasses.replace(cfg, readers=2), TokenizerConfig(kind="bytes"), 8, 32)
rows = slice(4 * p, 4 * p + 4)
tokens = [pipe.batch(s, rows)["tokens"].tolist() for s in range(4)] + [pipe.val_batch("a", 0, rows)["tokens"].tolist()]
print(json.dumps({"opened": sorted({o for o in opened if o.startswith(str(tmp))}), "tokens": tokens}))
"""


def test_two_processes_open_only_their_files_and_build_the_global_batch(tmp_path):
    cfg = corpus(tmp_path)
    whole = build(cfg, 2)  # tokenizes into the cache: what tools/prepare_data.py --config does
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(__file__)])}
    runs = [subprocess.run([sys.executable, "-c", PROCESS, str(tmp_path), str(p)], capture_output=True, text=True,
                           cwd=ROOT, env=env, check=False) for p in (0, 1)]
    out = []
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(json.loads(r.stdout.splitlines()[-1]))
    for step in range(4):
        assert np.concatenate([out[0]["tokens"][step], out[1]["tokens"][step]]).tolist() == whole.batch(step)[
            "tokens"].tolist()
    assert np.concatenate([out[0]["tokens"][4], out[1]["tokens"][4]]).tolist() == whole.val_batch("a", 0)[
        "tokens"].tolist()
    shards = [{o for o in x["opened"] if o.endswith("tokens.npy")} for x in out]
    shard_of = {os.path.join(e, "tokens.npy"): e for e in map(os.path.dirname, shards[0] | shards[1])}
    assert not any(o.endswith(".txt") for x in out for o in x["opened"])  # no text read: hashes remembered
    small = shards[0] & shards[1]  # the one-file source, every reader's
    assert len(small) == 1 and len(shards[0] - small) + len(shards[1] - small) == 5  # a's five files, dealt
    assert len(shard_of) == 6
