"""Lineage integrity: damaged records and parent graphs, cached eval results keyed by content, read-only
lineages, one publisher per version id, full disks, and exports that never overwrite.

Everything runs in process on the tiny model (a subprocess costs seconds); each refusal is checked for its
exit code or exception, its one-line message and, where nothing may change, a snapshot of the lineage.
"""

import contextlib
import dataclasses
import errno
import importlib.util
import io
import json
import os
import shutil
import subprocess

import flax.linen as nn
import jax
import pytest

from helpers import ROOT, assert_one_line, call, snapshot, tmpfs
from lmadapt.config import ModelConfig
from lmadapt.data.tokenizers import ByteTokenizer
from lmadapt.files import locks
from lmadapt.lineage.store import Lineage, LineageError
from lmadapt.model import init_params

CFG = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lineage_tool = _load("lineage_tool_integrity", "tools/lineage.py")
eval_cli = _load("eval_cli_integrity", "eval.py")


def params(seed: int):
    return nn.unbox(init_params(CFG, jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A lineage of two versions, v0 and its child v1 (copied by each test that changes anything)."""
    path = str(tmp_path_factory.mktemp("integrity") / "lin")
    lineage = Lineage(path)
    lineage.publish("v0", params(0), CFG, ByteTokenizer(), parents=[], steps=1, tokens=10)
    lineage.publish("v1", params(1), CFG, ByteTokenizer(), parents=["v0"], steps=2, tokens=20)
    return path


@pytest.fixture
def lin(base, tmp_path) -> str:
    shutil.copytree(base, tmp_path / "lin")
    return str(tmp_path / "lin")


def run(main, argv: list[str]) -> tuple[int, str, str]:
    """An entry point's main in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def cli(*argv: str) -> tuple[int, str, str]:
    """tools/lineage.py in process: (exit code, stdout, stderr)."""
    return run(lineage_tool.main, list(argv))


def edit_record(lin: str, vid: str, change) -> None:
    path = os.path.join(lin, "versions", vid, "record.json")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    text = change(record)
    if text in ("<removed>", "<fifo>"):  # a half-deleted version, or a special file put in its place
        os.remove(path)
        if text == "<fifo>":
            os.mkfifo(path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if isinstance(text, str) else json.dumps(record))


def one_error(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), repr(err)
    assert_one_line(lines[0], *needles)
    return lines[0]


# ---- 1. Records and the parent graph --------------------------------------------------------------------------


@pytest.mark.parametrize("change, needles", [
    (lambda r: r.pop("steps"), ["field 'steps' is missing"]),
    (lambda r: r.update(parents="v0"), ["field 'parents' is 'v0'", "a list of version ids"]),
    (lambda r: r.update(tokens="20"), ["field 'tokens' is '20'", "a whole number"]),
    (lambda r: r.update(id="v7"), ["field 'id' is 'v7'", "directory of version 'v1'"]),
    (lambda r: '{"id": "v1", "parents": [', ["unreadable"]),
    (lambda r: "[1, 2]", ["expected a JSON object"]),
    (lambda r: "[" * 100_000 + "]" * 100_000, ["unreadable JSON (nested too deeply)"]),
    (lambda r: "<removed>", ["not found: version 'v1' is damaged"]),
    (lambda r: "<fifo>", ["is a named pipe (FIFO), not a regular file: version 'v1' is damaged"]),
])
def test_a_damaged_record_is_named_and_the_others_still_list(lin, change, needles):
    edit_record(lin, "v1", change)
    record = os.path.join(lin, "versions", "v1", "record.json")
    with pytest.raises(LineageError) as e:
        Lineage(lin).record("v1")
    assert_one_line(str(e.value), record, *needles)
    assert Lineage(lin).ids() == ["v0", "v1"]  # sorting by `created` does not trip over the bad one
    before = snapshot(lin)
    rc, out, err = cli("--dir", lin, "list")
    assert rc == 1 and out.splitlines()[1].startswith("v0 ") and "steps" not in err
    assert_one_line(out.splitlines()[2], "v1", "DAMAGED:", "versions/v1/record.json", *needles)
    one_error(err, "1 damaged version(s) (v1)", "verify")
    rc, out, err = cli("--dir", lin, "tree")
    assert rc == 1 and out.splitlines()[0].startswith("v0  steps=1") and "v1  DAMAGED:" in out
    one_error(err, "(v1)")
    rc, out, err = cli("--dir", lin, "show", "v1")
    assert rc == 1
    one_error(err, record, *needles)
    rc, _, err = cli("--dir", lin, "diff", "v0", "v1")
    assert rc == 2
    one_error(err, record)
    assert snapshot(lin) == before


def test_parent_loops_and_missing_parents_never_loop(base, lin):
    lineage = Lineage(lin)
    # v1's parent is deleted by hand, and a new v0 naming v1 as its parent would close a loop: refused.
    shutil.rmtree(os.path.join(lin, "versions", "v0"))
    before = snapshot(lin)
    with pytest.raises(LineageError) as e:
        lineage.publish("v0", params(2), CFG, ByteTokenizer(), parents=["v1"])
    assert_one_line(str(e.value), "'v0'", "versions v0 -> v1 -> v0 form a loop")
    with pytest.raises(LineageError) as e:
        lineage.ancestry("v1")
    assert_one_line(str(e.value), "version 'v1' names parent 'v0', which is not in the lineage")
    rc, out, err = cli("--dir", lin, "tree")
    assert rc == 1 and out == "v1  steps=2 tokens=20  DAMAGED: parent 'v0' is not in the lineage\n"
    one_error(err, "(v1)")
    assert snapshot(lin) == before

    # A loop written into the records by hand: v0 <-> v1.
    shutil.rmtree(lin)
    shutil.copytree(base, lin)
    edit_record(lin, "v0", lambda r: r.update(parents=["v1"]))
    before = snapshot(lin)
    with pytest.raises(LineageError) as e:
        Lineage(lin).ancestry("v1")
    assert_one_line(str(e.value), "ancestry of 'v1' never reaches a root", "v1 -> v0 -> v1")
    rc, out, err = cli("--dir", lin, "list")
    rows = out.splitlines()[1:]
    assert rc == 1 and len(rows) == 2 and all("DAMAGED: its parents loop back to it" in r for r in rows), out
    one_error(err, "2 damaged version(s) (v0, v1)")
    rc, out, _ = cli("--dir", lin, "tree")
    assert rc == 1 and len(out.splitlines()) == 2 and out.startswith("v0  steps=1") and "└── v1" in out, out
    rc, out, _ = cli("--dir", lin, "verify")
    assert rc == 1 and "v0: TAMPERED" in out and "its parents loop back to it: v0 -> v1 -> v0" in out, out
    with pytest.raises(LineageError) as e:
        Lineage(lin).publish("v2", params(2), CFG, ByteTokenizer(), parents=["v1"])
    assert_one_line(str(e.value), "'v2'", "form a loop")
    rc, err = call(eval_cli.main, ["--lineage", lin, "--ancestry", "v1", "--config", TINY])
    assert rc == 2
    one_error(err, "never reaches a root")
    assert snapshot(lin) == before


# ---- 2. Cached eval results belong to the params they were computed from ------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7} times."
                                  for i in range(40)))
    return str(path)


def eval_args(lin: str, corpus: str, tmp_path, *extra: str, out: bool = True) -> list[str]:
    return ["--lineage", lin, "--config", TINY, *(["--out", str(tmp_path / "out")] if out else []), *extra,
            f"data.sources=[{{name: tiny, path: {corpus}, documents: blank_line}}]", "data.val_fraction=0.5",
            "eval.batches=1", "train.batch_size=2", "train.seq_len=32", f"data.cache_dir={tmp_path / 'cache'}"]


def run_eval(argv: list[str]) -> tuple[int, str, str]:
    return run(eval_cli.main, argv)


def test_cached_eval_results_belong_to_the_params_they_were_computed_from(lin, corpus, tmp_path):
    args = eval_args(lin, corpus, tmp_path, "--versions", "v0")
    rc, out, err = run_eval(args)
    assert rc == 0 and "v0 on tiny: loss" in out, err
    first = json.loads((tmp_path / "out" / "results.json").read_text())["lm"][0]
    with open(os.path.join(lin, "metrics", "v0.json"), encoding="utf-8") as f:
        stored = json.load(f)
    assert [e["params_hash"] for e in stored.values()] == [Lineage(lin).record("v0")["params_hash"]]
    rc, out, _ = run_eval(args)
    assert rc == 0 and "bits/byte" not in out  # reused: same params, split, tokenizer and seq_len

    # The version is deleted by hand and another model published under its id: the cache must not answer.
    shutil.rmtree(os.path.join(lin, "versions", "v0"))
    Lineage(lin).publish("v0", params(5), CFG, ByteTokenizer(), parents=[])
    assert Lineage(lin).metrics("v0") == {}
    rc, out, err = cli("--dir", lin, "verify", "v0")
    assert rc == 0 and "note: metrics/v0.json: 1 cached result(s)" in out and "are ignored" in out, out + err
    rc, out, _ = run_eval(args)
    again = json.loads((tmp_path / "out" / "results.json").read_text())["lm"][0]
    assert rc == 0 and "v0 on tiny: loss" in out and again["loss"] != first["loss"]
    assert again["params_hash"] == Lineage(lin).record("v0")["params_hash"] != first["params_hash"]
    # Another seq_len is another measurement.
    rc, out, _ = run_eval([*args, "train.seq_len=16"])
    assert rc == 0 and "v0 on tiny: loss" in out


def test_a_version_trained_with_cudnn_attention_is_evaluated_on_a_machine_without_gpus(lin, corpus, tmp_path):
    # cuDNN is how the version was trained on GPUs, not what it computes; reading it elsewhere must not fail
    # deep inside JAX ("cuDNN is not detected").
    Lineage(lin).publish("gpu", params(2), dataclasses.replace(CFG, attention="cudnn", dtype="bfloat16"),
                         ByteTokenizer(), parents=[])
    rc, out, err = run_eval(eval_args(lin, corpus, tmp_path, "--versions", "gpu"))
    assert rc == 0 and "gpu on tiny: loss" in out, err
    assert Lineage(lin).record("gpu")["model"]["attention"] == "cudnn"  # the record still says how


@pytest.mark.parametrize("damage, why", [
    ("{not json", "v0.json: unreadable"),
    ("[" * 100_000 + "]" * 100_000, "v0.json: unreadable JSON (nested too deeply)"),
    (None, "v0.json is a named pipe (FIFO)"),
])
def test_a_corrupt_metrics_file_is_ignored_with_one_warning(lin, corpus, tmp_path, capsys, damage, why):
    metrics = os.path.join(lin, "metrics")
    os.makedirs(metrics)
    if damage is None:
        os.mkfifo(os.path.join(metrics, "v0.json"))  # never opened: a reader would block on it
    else:
        with open(os.path.join(metrics, "v0.json"), "w") as f:
            f.write(damage)
    with open(os.path.join(metrics, "v1.json"), "w") as f:
        json.dump({"tiny:abc": 3, "other:def": {"loss": 1.0}}, f)
    with open(os.path.join(metrics, "gone.json"), "w") as f:
        json.dump({}, f)
    before = snapshot(lin)
    assert Lineage(lin).metrics("v0") == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metrics/{why}" in err and "ignored" in err
    assert Lineage(lin).metrics("v1") == {"other:def": {"loss": 1.0}}
    assert "entries 'tiny:abc' are not JSON objects" in capsys.readouterr().err
    rc, out, err = cli("--dir", lin, "show", "v0")
    assert rc == 0 and json.loads(out)["metrics"] == {} and len(err.splitlines()) == 1 and "warning:" in err
    rc, out, _ = cli("--dir", lin, "verify")
    assert rc == 1 and "v0: ok" in out and "v1: ok" in out, out
    for name, needle in (("v0", why[len("v0.json"):].lstrip(": ")), ("v1", "'tiny:abc' are not JSON objects"),
                         ("gone", "no version")):
        assert f"metrics/{name}.json: DAMAGED\n  " in out and needle in out
    assert snapshot(lin) == before
    rc, out, err = run_eval(eval_args(lin, corpus, tmp_path, "--versions", "v0"))
    assert rc == 0 and "v0 on tiny: loss" in out and (tmp_path / "out" / "results.json").is_file()
    assert len(err.splitlines()) == 1 and f"metrics/{why}" in err, err
    assert snapshot(lin) == before  # the damaged file is left for its owner, not overwritten


# ---- 3. Read-only lineages -----------------------------------------------------------------------------------


def test_a_read_only_lineage_is_read_and_never_written(base, corpus, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "ro", "8m") as mount:
        shutil.copytree(base, mount / "lin")
        lin = str(mount / "lin")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = snapshot(lin)
        for argv in (["list"], ["tree"], ["show", "v1"], ["diff", "v0", "v1"], ["verify"]):
            rc, out, err = cli("--dir", lin, *argv)
            assert rc == 0 and not err, (argv, err)
        from lmadapt.eval import report

        real = report.lm_scores
        monkeypatch.setattr(report, "lm_scores", lambda *a, **k: pytest.fail("computed before refusing"))
        rc, err = call(eval_cli.main, eval_args(lin, corpus, tmp_path, out=False))
        assert rc == 2
        one_error(err, f"{lin}/eval", "read-only file system", "pass --out DIR")
        monkeypatch.setattr(report, "lm_scores", real)
        rc, out, err = run_eval(eval_args(lin, corpus, tmp_path))
        assert rc == 0 and "v1 on tiny: loss" in out
        assert {r["version"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["lm"]} == {"v0",
                                                                                                            "v1"}
        assert_one_line(err.rstrip("\n"), "warning: results not cached in lineage", "read-only file system",
                        "in the report only")
        assert snapshot(lin) == before


# ---- 4. One publisher per id; full disks and failed writes --------------------------------------------------


def test_a_second_publisher_of_an_id_is_refused_at_once(lin):
    lock = os.path.join(lin, ".staging", "v2.lock")
    with locks.exclusive(lock, "a test holding it"):
        before = snapshot(lin)
        with pytest.raises(LineageError) as e:
            Lineage(lin).publish("v2", params(2), CFG, ByteTokenizer(), parents=["v1"])
        assert_one_line(str(e.value), "version 'v2' is being published", f"pid {os.getpid()}", lock)
        assert snapshot(lin) == before
    Lineage(lin).publish("v2", params(2), CFG, ByteTokenizer(), parents=["v1"])
    assert Lineage(lin).ancestry("v2") == ["v2", "v1", "v0"] and os.listdir(os.path.join(lin, ".staging")) == []


def test_the_commit_rename_stays_the_last_defence(lin, monkeypatch):
    """A publisher that got past the lock (a file system where flock locks nothing) still loses cleanly."""
    monkeypatch.setattr(locks, "exclusive_for_job", lambda *a, **k: contextlib.nullcontext())
    real_rename, raced = os.rename, []

    def rename(src, dst):
        if str(dst).endswith("/versions/v2") and not raced:  # the other one commits just before this one
            raced.append(True)
            Lineage(lin).publish("v2", params(3), CFG, ByteTokenizer(), parents=["v1"], note="other")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(LineageError) as e:
        Lineage(lin).publish("v2", params(2), CFG, ByteTokenizer(), parents=["v1"])
    assert_one_line(str(e.value), "'v2' was published to", "by another process while this one was writing it")
    assert Lineage(lin).record("v2")["note"] == "other" and os.listdir(os.path.join(lin, ".staging")) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's threads, on ENOSPC
def test_a_full_disk_or_a_failed_write_publishes_nothing_and_leaves_no_staging(lin, tmp_path, monkeypatch):
    from lmadapt.files import manifest
    from lmadapt.lineage import publish as lineage_publish

    with tmpfs(tmp_path / "small", "100k") as mount:
        small = str(mount / "lin")
        with pytest.raises(LineageError) as e:
            Lineage(small).publish("v0", params(0), CFG, ByteTokenizer(), parents=[])
        assert_one_line(str(e.value), "'v0'", "no space left on device", "nothing was written")
        assert os.listdir(mount) == []
        # The disk fills up after the check: Orbax fails midway, and its half-written copy is removed.
        monkeypatch.setattr(lineage_publish, "check_room", lambda *a: None)
        with pytest.raises(LineageError) as e:
            Lineage(small).publish("v0", params(0), CFG, ByteTokenizer(), parents=[])
        assert_one_line(str(e.value), "'v0' could not be written", "no space left on device", "nothing was published")
        assert not os.path.exists(os.path.join(small, "versions", "v0"))
        assert [n for n in os.listdir(os.path.join(small, ".staging")) if not n.endswith(".lock")] == []

    def broken(root, *a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.path.join(root, "MANIFEST.json"))

    monkeypatch.setattr(manifest, "write", broken)
    with pytest.raises(LineageError) as e:
        Lineage(lin).publish("v2", params(2), CFG, ByteTokenizer(), parents=["v1"])
    assert_one_line(str(e.value), "'v2' could not be written", "input/output error", "MANIFEST.json")
    assert not Lineage(lin).exists("v2")
    assert [n for n in os.listdir(os.path.join(lin, ".staging")) if not n.endswith(".lock")] == []


# ---- 5. Exports never overwrite; a missing folder is created ------------------------------------------------


def test_exports_never_overwrite_and_create_a_missing_folder(lin, tmp_path, monkeypatch):
    from lmadapt import hf

    keep = tmp_path / "keep.safetensors"
    keep.write_bytes(b"mine")
    before = snapshot(str(tmp_path))
    for out, needle in ((keep, "exists; refusing to overwrite"), (keep / "x.safetensors", "is not a directory")):
        rc, _, err = cli("--dir", lin, "export", "v0", "--out", str(out), "--format", "safetensors")
        assert rc == 2
        one_error(err, str(keep), needle)
    assert snapshot(str(tmp_path)) == before
    dump = tmp_path / "new" / "deeper" / "v0.safetensors"
    rc, _, err = cli("--dir", lin, "export", "v0", "--out", str(dump), "--format", "safetensors")
    assert rc == 0 and dump.is_file() and os.listdir(dump.parent) == ["v0.safetensors"], err
    rc, _, err = cli("--dir", lin, "export", "v0", "--out", str(tmp_path / "hf" / "deeper" / "v0"))
    assert rc == 0 and (tmp_path / "hf" / "deeper" / "v0" / "config.json").is_file(), err

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(hf, "save_safetensors_dump", full)
    rc, _, err = cli("--dir", lin, "export", "v0", "--out", str(tmp_path / "fail" / "v0.safetensors"), "--format",
                     "safetensors")
    assert rc == 2 and not (tmp_path / "fail").exists()
    one_error(err, "v0.safetensors", "No space left on device")


def test_a_parent_deleted_and_published_again_is_named_by_verify(lin):
    shutil.rmtree(os.path.join(lin, "versions", "v0"))
    Lineage(lin).publish("v0", params(5), CFG, ByteTokenizer(), parents=[])  # other params under the old id
    rc, out, _ = cli("--dir", lin, "verify")
    assert rc == 1 and "v0: ok" in out and "v1: TAMPERED" in out
    assert "parent 'v0' is not the version this one was trained from: it was deleted and published again" in out
