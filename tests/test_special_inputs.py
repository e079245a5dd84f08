"""Special files, symlink loops, duplicate YAML keys, override errors and damaged Hugging Face weights.

Every reader of a user-given path (data sources, configs, tokenizers, HF checkpoints) must refuse a named pipe,
a device, a socket or the wrong one of file/directory in one line saying what the path is, and never block on
it; a folder or glob through symlink loops reads each real file once; a YAML key written twice is an error
naming the file, line and key; an override's error names the override; NaN/Inf or integer weights are refused
naming the file and tensor. Everything runs in process and small: the whole file takes seconds.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import ROOT, assert_one_line, call, snapshot, write_raw_safetensors
from lmadapt.config import ConfigError, SourceConfig, load_config
from lmadapt.data import DataError
from lmadapt.data.sources import read_source

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the repository root's train.py)

_spec = importlib.util.spec_from_file_location("lineage_tool_special", os.path.join(ROOT, "tools", "lineage.py"))
lineage_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage_tool)

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")
# What each kind of special path is called in the errors.
KINDS = {"fifo": "is a named pipe (FIFO)", "chardev": "is a character device", "socket": "is a socket"}


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (rather than block the suite) if the body takes longer than `seconds`: a pipe opened blocks forever."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_special(path: str, kind: str) -> str:
    """A named pipe, a character device (a link to /dev/zero, which never ends) or a socket at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.symlink("/dev/zero", path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
    else:
        os.mkdir(path)
    return path


def raises_one_line(error: type[Exception], fn, *args, needles: tuple[str, ...] = ()) -> str:
    with no_hang(), pytest.raises(error) as e:
        fn(*args)
    assert_one_line(str(e.value), *needles)
    return str(e.value)


# ---- Data sources --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("src_kind", ["text", "jsonl"])
def test_special_file_as_a_data_path_is_named(tmp_path, kind, src_kind):
    path = make_special(str(tmp_path / "data.txt"), kind)
    src = SourceConfig(name="s", kind=src_kind, path=path)
    raises_one_line(DataError, read_source, src, needles=("source 's'", path, KINDS[kind], "not a regular file"))


@pytest.mark.parametrize("kind", KINDS)
def test_special_file_in_a_folder_or_glob_is_named_not_skipped(tmp_path, kind):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha\n")
    bad = make_special(str(d / "sub" / "b.txt"), kind)
    for pattern in (str(d), str(d / "*" / "*.txt"), str(d / "**" / "*.txt")):
        raises_one_line(DataError, read_source, SourceConfig(name="s", path=pattern),
                        needles=(repr(pattern), f"matches {bad}, which {KINDS[kind]}, not a regular file"))


def test_symlink_loops_and_duplicate_links_read_each_file_once(tmp_path):
    """A loop (`ln -s . loop`, `ln -s .. up`), a second link to a file and a second link to a folder: a folder
    walk and `**` globs read each real file once (glob.glob would go round both loops exponentially often)."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha\n")
    (d / "sub" / "b.txt").write_text("beta\n")
    os.symlink(".", d / "loop")
    os.symlink("..", d / "sub" / "up")
    os.symlink("a.txt", d / "dup.txt")
    os.symlink("sub", d / "sub_again")
    for pattern in (str(d), str(d / "**" / "*.txt"), str(d / "**"), str(d / "loop" / "**" / "*.txt")):
        with no_hang():
            read = read_source(SourceConfig(name="s", path=pattern, documents="file"))
        assert sorted(doc.text for doc in read.documents) == ["alpha\n", "beta\n"], pattern
        assert len(read.fingerprint["files"]) == 2, pattern


def test_compressed_and_plain_files_still_read(tmp_path):
    import gzip
    import lzma

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"gz text\n"))
    (tmp_path / "b.txt.xz").write_bytes(lzma.compress(b"xz text\n"))
    (tmp_path / "c.txt").write_text("plain text\n")
    read = read_source(SourceConfig(name="s", path=str(tmp_path), documents="file"))
    assert [doc.text for doc in read.documents] == ["gz text\n", "xz text\n", "plain text\n"]


def test_tfds_data_dir_that_is_a_file_or_holds_a_pipe(tmp_path):
    from lmadapt.data.tfds_source import read_tfds_texts

    file = tmp_path / "file"
    file.write_text("x")
    raises_one_line(DataError, read_tfds_texts, "my_corpus", "train", "text", str(file),
                    needles=(str(file), "is a regular file, not a directory"))
    pipe = make_special(str(tmp_path / "pipe"), "fifo")
    raises_one_line(DataError, read_tfds_texts, "my_corpus", "train", "text", pipe,
                    needles=(pipe, "is a named pipe (FIFO), not a directory"))
    version = tmp_path / "tfds" / "my_corpus" / "1.0.0"
    version.mkdir(parents=True)
    info = make_special(str(version / "dataset_info.json"), "fifo")
    raises_one_line(DataError, read_tfds_texts, "my_corpus:1.0.0", "train", "text", str(tmp_path / "tfds"),
                    needles=("my_corpus", info, "is a named pipe (FIFO)"))


def test_train_py_refuses_a_pipe_as_data_without_blocking_or_writing(tmp_path):
    d = str(tmp_path / "work")  # the pipe lies outside it: snapshot reads every file it finds
    pipe = make_special(str(tmp_path / "data.txt"), "fifo")
    argv = ["--config", TINY, f"run.dir={d}/run", f"data.cache_dir={d}/cache", "logging.progress=false",
            f"data.sources.0.path={pipe}"]
    before = snapshot(d)
    with no_hang(60):
        rc, err = call(train.main, argv)
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert_one_line(lines[0], pipe, "is a named pipe (FIFO), not a regular file")
    assert snapshot(d) == before  # not even the run directory and its lock, taken before anything else


# ---- Config files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "dir"])
def test_special_config_file_or_base_is_named(tmp_path, kind):
    path = make_special(str(tmp_path / "special.yaml"), kind)
    what = KINDS.get(kind, "is a directory")
    raises_one_line(ConfigError, load_config, path, needles=(f"config file {path!r} {what}, not a regular file",))
    top = tmp_path / "top.yaml"
    top.write_text("base: special.yaml\n")
    raises_one_line(ConfigError, load_config, str(top), needles=(str(top), "key 'base'", f"{path!r} {what}"))


@pytest.mark.parametrize(("text", "line", "key", "lines"), [
    ("train:\n  steps: 3\nmodel:\n  d_model: 32\ntrain:\n  seq_len: 16\n", 5, "train", " (lines 1 and 5)"),
    ("train:\n  steps: 3\n  seq_len: 16\n  steps: 5\n", 4, "train.steps", " (lines 2 and 4)"),
    ("data:\n  sources:\n    - name: a\n      path: x.txt\n      path: y.txt\n", 5, "data.sources.0.path",
     " (lines 4 and 5)"),
    ("train: {steps: 3, steps: 4}\n", 1, "train.steps", ""),
])
def test_duplicate_yaml_keys_are_refused_naming_file_line_and_key(tmp_path, text, line, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    raises_one_line(ConfigError, load_config, str(path),
                    needles=(f"{path}:{line}: key {key!r} appears twice{lines}; YAML would silently keep the last",))
    # In a base file: the base file is named.
    top = tmp_path / "top.yaml"
    top.write_text("base: dup.yaml\ntrain:\n  steps: 2\n")
    raises_one_line(ConfigError, load_config, str(top), needles=(f"{path}:{line}: key {key!r} appears twice",))


def test_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("data:\n  sources:\n    - &s {name: a, path: x.txt}\n    - {<<: *s, name: b}\n")
    assert [(s.name, s.path) for s in load_config(str(path)).data.sources] == [("a", "x.txt"), ("b", "x.txt")]


@pytest.mark.parametrize(("item", "needle"), [
    ("bogus.key=1", "override 'bogus.key=1' (command line): unknown key 'bogus'"),
    ("train.bogus=1", "override 'train.bogus=1' (command line): unknown key 'train.bogus'"),
    ("train.steps=abc", "override 'train.steps=abc' (command line): key 'train.steps' has value 'abc'; expected int"),
    ("train.steps=0", "override 'train.steps=0' (command line): key 'train.steps' has value 0; expected a positive"),
    ("train={steps: x}", "override 'train={steps: x}' (command line): key 'train.steps' has value 'x'"),
    ("data.sources.0.name=a/b", "override 'data.sources.0.name=a/b' (command line): key 'data.sources.0.name'"),
    ("train={steps: 1, steps: 2}", "override 'train={steps: 1, steps: 2}' (command line): key 'train.steps' "
     "appears twice"),
])
def test_override_errors_name_the_override_not_the_file(item, needle):
    message = raises_one_line(ConfigError, load_config, TINY, [item], needles=(needle,))
    assert TINY not in message


def test_file_errors_still_name_the_file_beside_overrides(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: many\n")
    message = raises_one_line(ConfigError, load_config, str(path), ["train.batch_size=4"],
                              needles=("key 'train.steps' has value 'many'",))
    assert message.startswith(f"{path}: ")


# ---- Tokenizers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokenizer_path_is_named(tmp_path, kind):
    from lmadapt.data.tokenizers import TokenizerError, load_tokenizer

    path = make_special(str(tmp_path / "tokenizer.json"), kind)
    raises_one_line(TokenizerError, load_tokenizer, path, needles=(path, KINDS[kind], "not a regular file"))
    raises_one_line(TokenizerError, load_tokenizer, str(tmp_path), needles=(path, KINDS[kind]))


def test_special_tokenizer_config_beside_a_real_tokenizer_is_named(tmp_path):
    from lmadapt.data.tokenizers import TokenizerError, load_tokenizer, save_hf_tokenizer, train_bpe

    save_hf_tokenizer(train_bpe(["a small tokenizer " * 20], 262), str(tmp_path))
    os.remove(tmp_path / "tokenizer_config.json")
    config = make_special(str(tmp_path / "tokenizer_config.json"), "fifo")
    raises_one_line(TokenizerError, load_tokenizer, str(tmp_path), needles=(config, "is a named pipe (FIFO)"))


# ---- Hugging Face checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama HF directory written with numpy from the conversion rules (no model init, torch or network)."""
    from lmadapt.config import ModelConfig
    from lmadapt.data.tokenizers import ByteTokenizer, save_hf_tokenizer
    from lmadapt.hf import config_to_hf, rules_for
    from lmadapt.hf.rules import hf_tensors

    cfg = ModelConfig(family="llama", vocab_size=260, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    path.mkdir()
    rng = np.random.default_rng(0)
    save_file({name: rng.normal(0, 0.02, shape).astype(np.float32) for name, shape, _ in hf_tensors(rules_for(cfg))},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    save_hf_tokenizer(ByteTokenizer(), str(path))
    return str(path)


def hf_copy(hf_dir: str, d: str) -> str:
    path = os.path.join(d, "hf")
    shutil.copytree(hf_dir, path)
    return path


def import_refused(d: str, path: str, *needles: str, look: bool = True) -> None:
    """tools/lineage.py import-hf exits 2 with one `error:` line naming the problem; nothing under d changes
    (`look` False: d holds a pipe, which a snapshot would open; then only the lineage's absence is checked)."""
    before = snapshot(d) if look else None
    lineage = os.path.join(d, "lineage")
    rc, err = call(lineage_tool.main, ["--dir", lineage, "import-hf", path])
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert_one_line(lines[0], *needles)
    assert not os.path.exists(lineage)
    if look:
        assert snapshot(d) == before


@pytest.mark.parametrize("kind", KINDS)
def test_special_hf_paths_are_named(tmp_path, hf_dir, kind):
    from lmadapt.hf import HFError, open_hf

    d = str(tmp_path)
    what = KINDS[kind]
    top = make_special(os.path.join(d, "top"), kind)
    raises_one_line(HFError, open_hf, top, needles=(top, what, "not a directory"))
    for name in ("config.json", "model.safetensors", "tokenizer.bytes"):
        path = hf_copy(hf_dir, os.path.join(d, name))
        os.remove(os.path.join(path, name))
        bad = make_special(os.path.join(path, name), kind)
        raises_one_line(HFError, open_hf, path, needles=(bad, what, "not a regular file"))
    with no_hang():
        import_refused(d, os.path.join(d, "model.safetensors", "hf"), "model.safetensors", what, look=False)


def test_hf_regular_file_given_for_the_directory(tmp_path, hf_dir):
    from lmadapt.hf import HFError, open_hf

    file = os.path.join(hf_dir, "config.json")
    raises_one_line(HFError, open_hf, file, needles=(file, "is a regular file, not a directory"))


def break_tensor(hf_dir: str, d: str, name: str, values: list[float], dtype=np.float32) -> str:
    """A copy of the tiny HF directory whose tensor `name` holds `values` at its first positions."""
    path = hf_copy(hf_dir, d)
    weights = os.path.join(path, "model.safetensors")
    state = {k: v.astype(dtype) for k, v in load_file(weights).items()}
    flat = state[name].reshape(-1)
    flat[:len(values)] = values
    os.remove(weights)
    save_file(state, weights, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nonfinite_hf_weights_are_refused_naming_file_tensor_and_count(tmp_path, hf_dir, dtype):
    from lmadapt.hf import HFError, open_hf

    d = str(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"  # (d_ff 32, d_model 16)
    path = break_tensor(hf_dir, d, name, [np.nan, np.inf, -np.inf], dtype)
    weights = os.path.join(path, "model.safetensors")
    ckpt = open_hf(path)  # headers only: no weights read yet
    raises_one_line(HFError, ckpt.load, needles=(weights, f"tensor {name}", "3 of its 512 values are NaN or Inf"))
    import_refused(d, path, weights, name, "NaN or Inf")


def test_nonfinite_hf_weights_loaded_onto_shardings_give_the_one_line(tmp_path, hf_dir):
    """The check runs inside jax.make_array_from_callback's callback: its HFError reaches the caller as is."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lmadapt.hf import HFError, open_hf

    name = "model.layers.0.mlp.up_proj.weight"
    ckpt = open_hf(break_tensor(hf_dir, str(tmp_path), name, [np.nan]))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    n = len(jax.devices())

    def spec(shape):
        return PartitionSpec("x") if shape and shape[0] % n == 0 else PartitionSpec()

    host = jax.eval_shape(lambda: open_hf(hf_dir).load())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32,
                                                         sharding=NamedSharding(mesh, spec(x.shape))), host)
    message = raises_one_line(HFError, ckpt.load, target, needles=(f"tensor {name}", "1 of the 64 values in its slice",
                                                                   "are NaN or Inf"))
    assert "Traceback" not in message


def test_nonfinite_values_are_counted_over_every_chunk(tmp_path, hf_dir, monkeypatch):
    """Chunks smaller than a row: values in the first and last chunks are both counted (one pass, no re-read)."""
    from lmadapt.hf import HFError, open_hf, safetensors_io

    name = "model.layers.0.mlp.up_proj.weight"
    path = break_tensor(hf_dir, str(tmp_path), name, [np.nan])
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state[name][-1, -1] = np.inf
    os.remove(weights)
    save_file(state, weights, metadata={"format": "pt"})
    monkeypatch.setattr(safetensors_io, "_CHUNK", 64)
    raises_one_line(HFError, open_hf(path).load, needles=(f"tensor {name}", "2 of its 512 values"))


@pytest.mark.parametrize(("code", "itemsize"), [("I32", 4), ("I64", 8), ("U8", 1), ("BOOL", 1)])
def test_integer_or_bool_hf_weights_are_refused_naming_the_dtype(tmp_path, hf_dir, code, itemsize):
    from lmadapt.hf import HFError, open_hf

    d = str(tmp_path)
    path = hf_copy(hf_dir, d)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    name = "model.norm.weight"
    raw = {k: ("F32", v.shape, v.astype(np.float32).tobytes()) for k, v in state.items()}
    raw[name] = (code, state[name].shape, bytes(state[name].size * itemsize))
    os.remove(weights)
    write_raw_safetensors(weights, raw)
    raises_one_line(HFError, open_hf, path,
                    needles=(weights, f"tensor {name} has dtype {code}", "expected F32, BF16, F16, F64"))
    import_refused(d, path, weights, f"tensor {name} has dtype {code}")


def test_in_memory_state_with_nonfinite_values_is_refused(hf_dir):
    from lmadapt.hf import HFError, from_hf, read_hf_state

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    state = read_hf_state(hf_dir)
    state["model.norm.weight"] = state["model.norm.weight"].copy()
    state["model.norm.weight"][:2] = np.nan
    raises_one_line(HFError, from_hf, state, config,
                    needles=("tensor model.norm.weight", "2 of its 16 values are NaN or Inf"))
