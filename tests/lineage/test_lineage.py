"""Model-version lineage: parents, write-once, atomic publish, tamper detection, the CLI, train.py."""

import importlib.util
import json
import os
import signal
import sys
import textwrap

import jax
import numpy as np
import pytest

from helpers import ROOT, TINY_MODEL, call, call_out, run_cmd, tiny_params
from lmadapt.data.tokenizers import ByteTokenizer
from lmadapt.lineage.store import Lineage, LineageError, check_version_id

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the repository root's train.py)

_spec = importlib.util.spec_from_file_location("lineage_tool", os.path.join(ROOT, "tools", "lineage.py"))
lineage_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage_tool)

def snapshot(directory):
    """Every file under a directory with its bytes (to prove an operation changed nothing)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
    return out


def test_publish_load_and_parent_chain(tmp_path):
    lineage = Lineage(str(tmp_path / "lin"))
    p0, p1 = tiny_params(0), tiny_params(1)
    lineage.publish("v0", p0, TINY_MODEL, ByteTokenizer(), parents=[], steps=5, tokens=100, note="base")
    lineage.publish("v1", p1, TINY_MODEL, ByteTokenizer(), parents=["v0"], steps=7, tokens=50,
                    artifacts={"fisher": jax.tree.map(np.abs, p1)})
    lineage.publish("v2", p0, TINY_MODEL, ByteTokenizer(), parents=["v1"])
    assert lineage.ids() == ["v0", "v1", "v2"]
    assert lineage.ancestry("v2") == ["v2", "v1", "v0"]
    assert lineage.record("v1")["parents"] == ["v0"] and lineage.record("v0")["note"] == "base"
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(lineage.load_params("v1")), strict=True):
        np.testing.assert_array_equal(x, y)
    fisher = lineage.load_artifact("v1", "fisher")
    np.testing.assert_array_equal(fisher["embed"]["embedding"], np.abs(p1["embed"]["embedding"]))
    assert lineage.model_config("v1") == TINY_MODEL
    stacked = lineage.load_params("v1", scan_layers=True)
    np.testing.assert_array_equal(stacked["layers"]["attn"]["q"]["kernel"][1], p1["layers_1"]["attn"]["q"]["kernel"])
    with pytest.raises(LineageError, match="parent version 'nope' of 'v3' is not in lineage"):
        lineage.publish("v3", p0, TINY_MODEL, ByteTokenizer(), parents=["nope"])
    with pytest.raises(LineageError, match="no version 'v9'"):
        lineage.record("v9")


def test_second_publish_of_an_id_fails_and_changes_nothing(tmp_path):
    lineage = Lineage(str(tmp_path / "lin"))
    lineage.publish("v0", tiny_params(0), TINY_MODEL, ByteTokenizer(), parents=[])
    before = snapshot(tmp_path / "lin")
    with pytest.raises(LineageError, match="version 'v0' already exists"):
        lineage.publish("v0", tiny_params(1), TINY_MODEL, ByteTokenizer(), parents=[])
    assert snapshot(tmp_path / "lin") == before


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "x..y", "a" * 200, "v 1"])
def test_version_ids_are_validated(bad):
    with pytest.raises(LineageError, match="is not valid"):
        check_version_id(bad)


def test_process_killed_mid_publish_leaves_a_valid_lineage(tmp_path):
    lin = tmp_path / "lin"
    Lineage(str(lin)).publish("v0", tiny_params(0), TINY_MODEL, ByteTokenizer(), parents=[])
    # The child process dies at the commit rename, after its params are fully written.
    script = textwrap.dedent(f"""
        import os, signal
        import flax.linen as nn, jax
        from lmadapt.config import ModelConfig, RopeScalingConfig
        from lmadapt.lineage.store import Lineage
        from lmadapt.model import init_params
        from lmadapt.data.tokenizers import ByteTokenizer
        cfg = ModelConfig(**{TINY_MODEL.__dict__!r})
        real_rename = os.rename
        os.rename = lambda a, b: os.kill(os.getpid(), signal.SIGKILL) if "/versions/" in str(b) else real_rename(a, b)
        Lineage({str(lin)!r}).publish("v1", nn.unbox(init_params(cfg, jax.random.PRNGKey(1))), cfg, ByteTokenizer(),
                                      parents=["v0"])
    """)
    result = run_cmd(["-c", script])
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    lineage = Lineage(str(lin))
    assert lineage.ids() == ["v0"] and lineage.verify("v0") == []
    assert not lineage.exists("v1")
    # The half-written staging copy does not block a later publish of the same id.
    lineage.publish("v1", tiny_params(1), TINY_MODEL, ByteTokenizer(), parents=["v0"])
    assert lineage.ids() == ["v0", "v1"] and lineage.verify("v1") == []


def test_verify_catches_a_flipped_byte(tmp_path):
    lineage = Lineage(str(tmp_path / "lin"))
    lineage.publish("v0", tiny_params(0), TINY_MODEL, ByteTokenizer(), parents=[])
    assert lineage.verify("v0") == []
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(lineage.path("v0") + "/params") for f in fs
                  if "/d/" in os.path.join(r, f)]
    victim = max(data_files, key=os.path.getsize)  # the biggest array chunk
    with open(victim, "rb") as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0x01
    with open(victim, "wb") as f:
        f.write(bytes(raw))
    problems = lineage.verify("v0")
    assert any("contents changed" in p and os.path.relpath(victim, lineage.path("v0")) in p for p in problems)
    out = run_cmd(["tools/lineage.py", "--dir", str(tmp_path / "lin"), "verify"])
    assert out.returncode == 1 and "v0: TAMPERED" in out.stdout


def test_metrics_added_later_do_not_touch_the_version(tmp_path):
    lineage = Lineage(str(tmp_path / "lin"))
    lineage.publish("v0", tiny_params(0), TINY_MODEL, ByteTokenizer(), parents=[], metrics={"eval/loss": 2.5})
    before = snapshot(lineage.path("v0"))
    lineage.add_metrics("v0", "books:abc123", {"loss": 2.0})
    assert lineage.metrics("v0") == {"eval/loss": 2.5, "books:abc123": {"loss": 2.0}}
    assert snapshot(lineage.path("v0")) == before and lineage.verify("v0") == []


def test_train_py_publishes_versions_and_the_cli_reads_them(tmp_path):
    lin, cache = tmp_path / "lin", tmp_path / "cache"
    common = ["train.py", "--config", "configs/tiny.yaml", "train.steps=4", "logging.progress=false", "mesh.data=1",
              "checkpoint.every=0", "eval.every=0", f"lineage.dir={lin}", f"data.cache_dir={cache}"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    first = run_cmd([*common, f"run.dir={tmp_path / 'r0'}", "version.id=base", "version.note=first"], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cmd([*common, f"run.dir={tmp_path / 'r1'}", "init.from_version=base", "version.id=child"], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting from version 'base'" in second.stdout and "published version 'child'" in second.stdout
    # Restarting a finished run does not publish again.
    here = [*common[1:], "mesh.data=-1"]  # in process, on the test's 8 devices
    rc, out, err = call_out(train.main, [*here, f"run.dir={tmp_path / 'r1'}", "init.from_version=base",
                                         "version.id=child"])
    assert rc == 0 and "already published as version 'child'" in out, err[-2000:]
    # A new run may not take an existing id, nor start from a missing one (refused before any work: in process).
    rc, err = call(train.main, [*common[1:], f"run.dir={tmp_path / 'r2'}", "version.id=base"])
    assert rc == 2 and "version.id 'base' already exists" in err
    rc, err = call(train.main, [*common[1:], f"run.dir={tmp_path / 'r3'}", "init.from_version=nope"])
    assert rc == 2 and "init.from_version" in err and "no version 'nope'" in err

    lineage = Lineage(str(lin))
    rec = lineage.record("child")
    # Tokens trained on: the loss-carrying ones of 4 batches of 8 rows of 64 (a row may end partly empty).
    assert rec["parents"] == ["base"] and rec["steps"] == 4 and 0.9 * 4 * 8 * 64 < rec["tokens"] <= 4 * 8 * 64
    assert rec["data"]["sources"]["shakespeare"]["fingerprint"]["files"][0]["sha256"]
    assert rec["data"]["tokens_seen"] == {"shakespeare": rec["tokens"]} and "eval/loss" in rec["metrics"]
    assert rec["config"]["init"]["from_version"] == "base"

    def cli(*args):  # in process: the tool as a user runs it, without a Python start per command
        rc, out, err = call_out(lineage_tool.main, ["--dir", str(lin), *args])
        assert rc == 0, err[-2000:]
        return out

    assert [line.split()[0] for line in cli("list").splitlines()[1:]] == ["base", "child"]
    assert cli("tree").splitlines()[1].startswith("└── child")
    assert json.loads(cli("show", "child"))["parents"] == ["base"]
    diff = cli("diff", "base", "child")
    assert "init.from_version: None -> 'base'" in diff and "layers_0" in diff
    change = float(next(line.split()[1] for line in diff.splitlines() if line.strip().startswith("layers_0")))
    assert 0 < change < 1
    assert cli("verify") == "base: ok\nchild: ok\n"
    rc, _, err = call_out(lineage_tool.main, ["--dir", str(lin), "show", "../x"])
    assert rc == 2 and "is not valid" in err

    # Export to Hugging Face and import back as a root version: the same params, bit for bit.
    hf_dir = tmp_path / "hf_child"
    assert "exported child" in cli("export", "child", "--out", str(hf_dir))
    assert (hf_dir / "model.safetensors").is_file() and json.loads((hf_dir / "config.json").read_text())[
        "architectures"] == ["LlamaForCausalLM"]
    assert "as version child-again" in cli("import-hf", str(hf_dir), "--id", "child-again")
    assert lineage.record("child-again")["params_hash"] == rec["params_hash"]
    assert lineage.record("child-again")["parents"] == []
    rc, _, err = call_out(lineage_tool.main, ["--dir", str(lin), "export", "child", "--out", str(hf_dir)])
    assert rc == 2 and "error:" in err

    # train.py from Hugging Face weights: the import becomes (or reuses) a root version, the run its child.
    rc, _, err = call_out(train.main, [*here, f"run.dir={tmp_path / 'r4'}", f"init.from_hf={hf_dir}",
                                       "version.id=from-hf"])
    assert rc == 0, err[-3000:]
    (root,) = lineage.record("from-hf")["parents"]
    assert root.startswith("hf-hf_child-") and lineage.record(root)["params_hash"] == rec["params_hash"]


def test_a_version_saved_on_8_devices_reads_and_exports_on_1(tmp_path):
    # A version trained on a mesh must read back (export, eval, verify) on a machine with other devices.
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(
        "fsdp" if x.ndim and x.shape[0] % 8 == 0 else None))), tiny_params(0))
    Lineage(str(tmp_path / "lin")).publish("v0", sharded, TINY_MODEL, ByteTokenizer(), parents=[])
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = run_cmd(["tools/lineage.py", "--dir", str(tmp_path / "lin"), "export", "v0", "--out", str(tmp_path / "hf")],
                  env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert run_cmd(["tools/lineage.py", "--dir", str(tmp_path / "lin"), "verify"], env=env).returncode == 0


def test_merge_and_interpolate_publish_versions_with_their_sources_as_parents(tmp_path):
    from lmadapt.continual.merge import average, publish_interpolation, publish_merge

    lineage = Lineage(str(tmp_path / "lin"))
    p0, p1 = tiny_params(0), tiny_params(1)
    lineage.publish("v0", p0, TINY_MODEL, ByteTokenizer(), parents=[])
    lineage.publish("v1", p1, TINY_MODEL, ByteTokenizer(), parents=["v0"])
    assert publish_merge(lineage, ["v0", "v1"], "soup", [3, 1]) == "merge of v0, v1 with weights [3, 1]"
    # alpha weighs the version; the other defaults to its first parent.
    assert publish_interpolation(lineage, "v1", None, 0.25, "wise", note="n") == "n"
    for vid, sources, weights in (("soup", ["v0", "v1"], [3, 1]), ("wise", ["v1", "v0"], [0.25, 0.75])):
        record = lineage.record(vid)
        assert record["parents"] == sources and record["strategy"]["sources"] == sources
        assert record["strategy"]["kind"] == "merge" and record["strategy"]["weights"] == weights
        want = average([{"v0": p0, "v1": p1}[v] for v in sources], weights)
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(lineage.load_params(vid)), strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(LineageError, match="'v0' has no parent to interpolate with"):
        publish_interpolation(lineage, "v0", None, 0.5, "x")
    with pytest.raises(LineageError, match="weights must be finite, non-negative"):
        publish_interpolation(lineage, "v1", "v0", 1.5, "x")
    assert not lineage.exists("x")

    # The CLI: the same, with one line for what it published or why it refused.
    rc, out, _ = call_out(lineage_tool.main, ["--dir", lineage.directory, "merge", "v0", "v1", "--id", "m"])
    assert rc == 0 and out == "published m: merge of v0, v1 with weights equal\n"
    rc, out, _ = call_out(lineage_tool.main, ["--dir", lineage.directory, "interpolate", "v1", "--alpha", "0.5",
                                              "--id", "i"])
    assert rc == 0 and out == "published i: interpolate of v1, v0 with weights [0.5, 0.5]\n"
    rc, _, err = call_out(lineage_tool.main, ["--dir", lineage.directory, "merge", "v0", "v1", "--id", "m"])
    assert rc == 2 and err.startswith("error: version 'm' already exists")
