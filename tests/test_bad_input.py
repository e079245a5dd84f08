"""Bad input, fuzzed: configs, data files, lineage version ids and Hugging Face directories.

The property, for every bad input: the entry point returns non-zero and prints exactly one line,
`error: ...`, naming the problem (the file, key, value or tensor), and nothing on disk changes (every
file and folder under the test's directories keeps its size and sha256, and nothing is added). A
fuzzed input that happens to be valid must be accepted by the loader that checks it; it is never
trained.

Cases run in process (`train.main`, `tools/lineage.py`'s `main`, the library), since a subprocess
costs seconds; the last tests run the real commands to prove the command-line path.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from helpers import ROOT, assert_one_line, call, run_cmd, snapshot, write_raw_safetensors
from lmadapt.config import Config, ConfigError, SourceConfig, load_config
from lmadapt.data.sources import read_source
from lmadapt.lineage.store import LineageError, check_version_id

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the repository root's train.py)

_spec = importlib.util.spec_from_file_location("lineage_tool", os.path.join(ROOT, "tools", "lineage.py"))
lineage_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage_tool)

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare.txt.xz")
N_DEVICES = 8  # conftest: --xla_force_host_platform_device_count=8


def fuzz(n: int) -> settings:
    """Hypothesis settings of this file: `n` examples (times $LMADAPT_FUZZ_SCALE, for a longer hunt), no
    deadline (the first call of a kind initialises JAX)."""
    scale = float(os.environ.get("LMADAPT_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(n * scale)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- The property ------------------------------------------------------------------------------------------------


def refused(main, argv: list[str], roots: list[str], *needles: str) -> str:
    """`main(argv)` exits non-zero with one `error: ` line holding every needle, and `roots` do not change."""
    before = snapshot(*roots)
    rc, err = call(main, argv)
    assert rc != 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", repr(err)
    assert_one_line(lines[0], *needles)
    assert snapshot(*roots) == before
    return lines[0]


def base_args(tmp: str, *extra: str) -> list[str]:
    """train.py arguments for the tiny config with everything it could write inside `tmp`."""
    return ["--config", TINY, f"run.dir={tmp}/run", f"data.cache_dir={tmp}/cache", "logging.progress=false",
            f"data.sources.0.path={SHAKESPEARE}", *extra]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A fresh folder per hypothesis example: `with scratch() as d: ...` (removed afterwards)."""
    base = str(tmp_path_factory.mktemp("bad-input"))

    @contextlib.contextmanager
    def make():
        d = tempfile.mkdtemp(dir=base)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    return make


# ---- Configs: derived from the dataclass tree ----------------------------------------------------------------------


def _leaves(cls: type, prefix: str = ""):
    """(dotted key, type) of every field of the config tree; the first data source (tiny.yaml has one) is
    walked into, other lists of sections (stages, groups, replay sources) are fuzzed as whole values."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, key + ".")
            continue
        yield key, hint
        if key == "data.sources":
            yield from _leaves(SourceConfig, "data.sources.0.")


def _sections(cls: type, prefix: str = ""):
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], prefix + f.name + ".")
    if prefix == "data.":
        yield "data.sources.0.", SourceConfig


LEAVES = sorted(k for k, _ in _leaves(Config))
SECTIONS = sorted(_sections(Config), key=lambda s: s[0])

# Wrong types, zero, negative, huge, non-finite, empty: values a typo or a bad template produces.
SCALARS = st.one_of(
    st.sampled_from([0, -1, -7, -(2**31), 2**63, 10**400, 0.0, -0.5, 1.5, 1e-12, math.nan, math.inf, -math.inf,
                     True, False, None, "", " ", "x", "1e-3", "nan", "-1", "on", "../x", [], {}, [1, "a"], [[]],
                     {"a": 1}]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def nest(key: str, value: object) -> dict:
    """The YAML tree that sets dotted `key` on top of tiny.yaml (a data-source field rewrites the source list)."""
    parts = key.split(".")
    if parts[:3] == ["data", "sources", "0"]:
        return {"data": {"sources": [{"name": "shakespeare", "path": SHAKESPEARE, parts[3]: value}]}}
    tree: object = value
    for p in reversed(parts):
        tree = {p: tree}
    return tree


def write_config(d: str, tree: dict) -> str:
    path = os.path.join(d, "bad.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"base": TINY, **tree}, f)  # ASCII with escapes: raw U+0085 would read back as a line break
    return path


def yaml_text(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix(
        "\n...\n").rstrip("\n")


@fuzz(120)
@given(key=st.sampled_from(LEAVES), value=VALUES, via_file=st.booleans())
def test_fuzzed_value_loads_or_names_its_key(scratch, key, value, via_file):
    with scratch() as d:
        path = write_config(d, nest(key, value)) if via_file else TINY
        overrides = [] if via_file else [f"{key}={yaml_text(value)}"]
        try:
            load_config(path, overrides)
        except ConfigError as e:
            leaf = [p for p in key.split(".") if not p.isdigit()][-1]
            # The key itself, or (a cross-field check) the key it conflicts with, which mentions this one.
            assert_one_line(str(e), leaf)
            assert path in str(e) or "command line" in str(e) or "override" in str(e), str(e)


@fuzz(40)
@given(section=st.sampled_from(SECTIONS), name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
       | st.text(min_size=1, max_size=8) | st.integers(), value=SCALARS)
def test_unknown_keys_are_named(scratch, section, name, value):
    prefix, cls = section
    assume(str(name) not in {f.name for f in dataclasses.fields(cls)} and not (prefix == "" and name == "base"))
    if prefix == "data.sources.0.":
        tree = {"data": {"sources": [{"name": "shakespeare", "path": SHAKESPEARE, name: value}]}}
    else:
        tree = nest(prefix + "x", None) if prefix else {}
        node = tree
        for p in prefix.rstrip(".").split(".") if prefix else []:
            node = node[p]
        node.clear()
        node[name] = value
    with scratch() as d:
        path = write_config(d, tree)
        with pytest.raises(ConfigError) as e:
            load_config(path)
    assert_one_line(str(e.value), f"unknown key {prefix + str(name)!r}", path)


@fuzz(40)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_fuzzed_yaml_file_loads_or_is_refused_in_one_line(scratch, text):
    with scratch() as d:
        path = os.path.join(d, "fuzz.yaml")
        with open(path, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode("utf-8"))
        try:
            load_config(path)
        except ConfigError as e:
            assert_one_line(str(e), path)


@pytest.mark.parametrize(("blob", "needle"), [
    (b"base: 3\n", "key 'base' has value 3"),
    (b"base: [3, x.yaml]\n", "key 'base' has value [3, 'x.yaml']"),
    (b"base: {a: 1}\n", "key 'base'"),
    (b"base: nope.yaml\n", "nope.yaml' not found"),
    (b"train:\n  steps: 3\x07\n", "not valid YAML (unacceptable character #x0007"),
    (b"train:\n  steps: \xff\xfe\n", "not UTF-8 text (byte 16)"),
    (b"{1: a, b: 2}\n", "unknown key '1'"),
    (b"- 1\n- 2\n", "top level must be a mapping"),
])
def test_malformed_yaml_files(tmp_path, blob, needle):
    path = write_bytes(str(tmp_path), "bad.yaml", blob)
    refused(train.main, ["--config", path], [str(tmp_path)], path, needle)


@fuzz(40)
@given(item=st.text(max_size=40) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(LEAVES), st.text(max_size=20)))
def test_fuzzed_override_loads_or_is_refused_in_one_line(item):
    try:
        load_config(TINY, [item])
    except ConfigError as e:
        assert_one_line(str(e))


def _mesh_fits(sizes: tuple[int, int, int]) -> bool:
    fixed = math.prod(s for s in sizes if s != -1)
    return N_DEVICES % fixed == 0 if -1 in sizes else fixed == N_DEVICES


@fuzz(25)
@given(sizes=st.tuples(*[st.sampled_from([-2, -1, 0, 1, 2, 3, 4, 5, 8, 16, 1000])] * 3))
def test_mesh_that_does_not_fit_the_devices_is_refused_before_compiling(scratch, sizes):
    mesh = [f"mesh.{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), sizes, strict=True)]
    with scratch() as d:
        try:
            load_config(TINY, mesh)
        except ConfigError as e:  # zero, negative, two -1s: refused by validation
            assert_one_line(str(e), "mesh")
            return
        assume(not _mesh_fits(sizes))  # a mesh that fits would train: not this test's business
        refused(train.main, base_args(d, *mesh), [d], "mesh", f"{N_DEVICES} devices")


@fuzz(15)
@given(max_len=st.integers(1, 512), over=st.integers(1, 10**6))
def test_seq_len_over_the_model_maximum(scratch, max_len, over):
    with scratch() as d:
        refused(train.main, base_args(d, f"model.max_seq_len={max_len}", f"train.seq_len={max_len + over}"), [d],
                "train.seq_len", f"{max_len + over}", f"model.max_seq_len={max_len}")


# ---- Data files ----------------------------------------------------------------------------------------------------


def data_args(d: str, path: str, kind: str = "text", *extra: str) -> list[str]:
    return base_args(d, f"data.sources.0.path={path}", f"data.sources.0.kind={kind}", *extra)


def write_bytes(d: str, name: str, blob: bytes) -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(blob)
    return path


@fuzz(15)
@given(blob=st.binary(max_size=3000), at=st.integers(0, 3000), kind=st.sampled_from(["text", "jsonl"]))
def test_binary_file_is_refused(scratch, blob, at, kind):
    blob = blob[:at] + b"\0" + blob[at:]
    with scratch() as d:
        path = write_bytes(d, "data.bin", blob)
        first = blob.find(b"\0")
        refused(train.main, data_args(d, path, kind), [d], path, f"NUL byte at offset {first}")


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=300)
INVALID_UTF8 = st.sampled_from([b"\xff", b"\x80", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x28\x8c\xbc", b"\xe2\x82"])


@fuzz(15)
@given(before=TEXT, bad=INVALID_UTF8, after=TEXT)
def test_invalid_utf8_is_counted_or_refused_by_policy(scratch, before, bad, after):
    blob = before.encode() + bad + after.encode()
    offset = len(before.encode())
    with scratch() as d:
        path = write_bytes(d, "data.txt", blob)
        refused(train.main, data_args(d, path, "text", "data.decode_errors=fail"), [d], path, f"byte {offset}",
                "data.decode_errors")
        # The default policy replaces and counts (train.py logs the count): text with a stray byte trains.
        read = read_source(SourceConfig(name="x", path=path, documents="file"))
        assert read.replaced_chars >= 1 or not (before + after).strip()


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


# Characters str.splitlines() would also split at: kept out of the "not JSON" text, whose line number is asserted.
_ONE_LINE = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
BAD_LINES = st.one_of(
    st.tuples(st.just("json"), st.sampled_from(["{bad", "[1,", "text", "{'text': 'a'}", '{"text": }', '{"text": "a"']
                                                ) | st.text(_ONE_LINE, min_size=1, max_size=30).filter(
        lambda s: s.strip() and _not_json(s))),
    st.tuples(st.just("object"), st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                                           st.none(), st.booleans()).map(json.dumps)),
    st.tuples(st.just("field"), st.dictionaries(st.sampled_from(["txt", "Text", "content", "label"]),
                                                st.text(max_size=5), max_size=3).map(json.dumps)),
    st.tuples(st.just("type"), st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
                                         st.lists(st.text(max_size=3), max_size=2),
                                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)).map(
        lambda v: json.dumps({"text": v}))),
)
EXPECTED = {"json": "not valid JSON", "object": "expected a JSON object", "field": "no field 'text'",
            "type": "field 'text' is"}


@fuzz(25)
@given(good=st.lists(TEXT.map(lambda t: json.dumps({"text": t}, ensure_ascii=False)), max_size=5),
       bad=BAD_LINES, data=st.data())
def test_malformed_jsonl_names_file_and_line(scratch, good, bad, data):
    kind, line = bad
    at = data.draw(st.integers(0, len(good)))
    lines = good[:at] + [line] + good[at:]
    with scratch() as d:
        path = write_bytes(d, "data.jsonl", "\n".join(lines).encode())
        refused(train.main, data_args(d, path, "jsonl"), [d], f"{path}:{at + 1}:", EXPECTED[kind])


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    # json.dumps(ensure_ascii=False) keeps U+2028, U+0085 and friends raw inside strings: still one record a line.
    records = [{"text": f"a{c}b"} for c in "\u2028\u2029\x85\x0b\x0c\x1c"]
    path = write_bytes(str(tmp_path), "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records
                                                           ).encode())
    read = read_source(SourceConfig(name="x", kind="jsonl", path=path))
    assert [doc.text for doc in read.documents] == [r["text"] for r in records]


@pytest.mark.parametrize(("content", "kind", "needle"), [
    (b"", "text", "holds no documents"),
    (b"\n \n\t\n", "text", "holds no documents"),
    (b"", "jsonl", "holds no documents"),
    (b"\n\n", "jsonl", "holds no documents"),
    (b"one line of text\n", "text", "a held-out split needs at least 2"),
    (b"x\n\n" * 50, "text", "fewer than one batch"),
])
def test_empty_or_too_small_data_is_refused_and_caches_nothing(tmp_path, content, kind, needle):
    d = str(tmp_path)
    path = write_bytes(d, "data.txt", content)
    extra = ["data.sources.0.documents=blank_line"] if kind == "text" else []
    refused(train.main, data_args(d, path, kind, *extra), [d], needle, "shakespeare")


def test_missing_path_and_empty_folder(tmp_path):
    d = str(tmp_path)
    os.mkdir(os.path.join(d, "empty"))
    refused(train.main, data_args(d, os.path.join(d, "nope.txt")), [d], "nope.txt", "not found")
    refused(train.main, data_args(d, os.path.join(d, "empty")), [d], "empty", "matches no files")


@fuzz(15)
@given(size=st.integers(1, 20_000), limit=st.integers(1_000, 10_000), kind=st.sampled_from(["jsonl", "file"]))
def test_huge_single_line_over_the_limit_is_refused(scratch, size, limit, kind):
    body = "é" * (size // 2) + "a" * (size % 2)  # two UTF-8 bytes a character: bytes, not characters, count
    line = json.dumps({"text": body}, ensure_ascii=False) if kind == "jsonl" else body
    blob = ("\n".join([json.dumps({"text": "short"})] * 3 + [line]) if kind == "jsonl" else line).encode()
    n = len(line.encode())
    with scratch() as d:
        path = write_bytes(d, "data.txt", blob)
        src = SourceConfig(name="x", kind="jsonl" if kind == "jsonl" else "text", path=path, documents="file")
        if n <= limit:  # a long line under the limit is text like any other
            assert read_source(src, max_document_bytes=limit).documents[-1].text == body
            return
        extra = ["data.sources.0.documents=file"] if kind == "file" else []
        refused(train.main, data_args(d, path, src.kind, f"data.max_document_bytes={limit}", *extra), [d],
                f"{path}:{4 if kind == 'jsonl' else 1}:", f"{n:,} bytes", f"data.max_document_bytes={limit:,}")


def test_long_line_cut_into_documents_and_the_default_limit(tmp_path):
    line = "word " * 300_000  # 1.5 MB on one line
    path = write_bytes(str(tmp_path), "long.txt", line.encode())
    # documents: chars cuts a long line into max_chars pieces, so no document is over any limit.
    docs = read_source(SourceConfig(name="x", path=path), max_document_bytes=10_000).documents
    assert "".join(d.text for d in docs) == line and max(len(d.text) for d in docs) <= 4096
    # Under the default limit (64 MiB) a 1.5 MB single-document file or JSONL line is accepted.
    assert read_source(SourceConfig(name="x", path=path, documents="file")).documents[0].text == line
    jsonl = write_bytes(str(tmp_path), "long.jsonl", json.dumps({"text": line}).encode())
    assert read_source(SourceConfig(name="x", kind="jsonl", path=jsonl)).documents[0].text == line


# ---- Lineage version ids -------------------------------------------------------------------------------------------

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION_IDS = st.one_of(
    st.sampled_from(["../x", "..", ".", "/abs/path", "/", "", " ", "a" * 129, "a" * 300, "vé", "v\u00a0", " v1",
                     "v1 ", "v\t1", "a\0b", "a/b", "a\\b", "x..y", "-x", "_x", ".hidden", "v1\n", "~", "$HOME",
                     "con", "a" * 128, "v1"]),
    st.text(max_size=40),
    st.text(alphabet="ab./-_ \\é\0", max_size=10),
    st.from_regex(_ID, fullmatch=True),
)


def _valid_id(vid: str) -> bool:
    return _ID.fullmatch(vid) is not None and ".." not in vid


@fuzz(30)
@given(vid=VERSION_IDS)
def test_version_ids_check_and_config(scratch, vid):
    if _valid_id(vid):
        assert check_version_id(vid) == vid
    else:
        with pytest.raises(LineageError) as e:
            check_version_id(vid)
        assert_one_line(str(e.value), repr(vid))
    with scratch() as d:
        for key in ("version.id", "init.from_version"):
            path = write_config(d, {**nest(key, vid), "lineage": {"dir": os.path.join(d, "lineage")}})
            if _valid_id(vid):
                cfg = load_config(path)
                assert cfg.version.id == vid or cfg.init.from_version == vid
                continue
            refused(train.main, ["--config", path], [d], key, repr(vid))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A valid tiny Llama Hugging Face directory (exported from lmadapt params, no torch needed)."""
    import jax
    from flax import linen as nn

    from lmadapt.config import ModelConfig
    from lmadapt.data.tokenizers import ByteTokenizer
    from lmadapt.hf import export_hf
    from lmadapt.model import init_params

    cfg = ModelConfig(family="llama", vocab_size=260, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)
    path = str(tmp_path_factory.mktemp("hf") / "tiny-llama")
    return export_hf(path, nn.unbox(init_params(cfg, jax.random.key(0))), cfg, ByteTokenizer())


@pytest.fixture(scope="module")
def lineage_dir(tmp_path_factory, hf_dir):
    """A lineage holding one version (the tiny HF model, imported)."""
    path = str(tmp_path_factory.mktemp("lineage") / "lin")
    rc, err = call(lineage_tool.main, ["--dir", path, "import-hf", hf_dir, "--id", "v1"])
    assert rc == 0, err
    return path


@fuzz(40)
@given(vid=VERSION_IDS, command=st.sampled_from(["show", "verify", "export", "diff", "import-hf"]))
def test_lineage_tool_refuses_bad_or_unknown_ids(scratch, lineage_dir, hf_dir, vid, command):
    assume(vid != "v1")
    with scratch() as d:
        out = os.path.join(d, "out")
        if command == "import-hf":
            assume(not _valid_id(vid))  # a valid id would publish the import, as it should
            argv = ["import-hf", hf_dir, f"--id={vid}"]  # "=": an id like "-x" is not taken for an option
        else:
            argv = {"show": ["show", "--", vid], "verify": ["verify", "--", vid], "diff": ["diff", "--", "v1", vid],
                    "export": ["export", "--out", out, "--", vid]}[command]
        needle = "is not valid" if not _valid_id(vid) else f"no version {vid!r}"
        refused(lineage_tool.main, ["--dir", lineage_dir, *argv], [d, lineage_dir, hf_dir], needle, repr(vid))


# ---- Hugging Face directories --------------------------------------------------------------------------------------


def mutated_copy(hf_dir: str, d: str, state: dict) -> str:
    path = os.path.join(d, "hf")
    shutil.copytree(hf_dir, path)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def assert_hf_refused(d: str, path: str, *needles: str) -> None:
    """import_hf, train.py (init.from_hf) and tools/lineage.py import-hf refuse `path` by name; nothing changes."""
    from lmadapt.hf import HFError, import_hf

    before = snapshot(d)
    with pytest.raises(HFError) as e:
        import_hf(path)
    assert_one_line(str(e.value), path, *needles)
    lin = os.path.join(d, "lineage")
    refused(train.main, base_args(d, f"init.from_hf={path}", f"lineage.dir={lin}"), [d], "init.from_hf", *needles)
    refused(lineage_tool.main, ["--dir", lin, "import-hf", path], [d], *needles)
    assert snapshot(d) == before and not os.path.exists(lin)


@fuzz(15)
@given(change=st.sampled_from(["drop", "extra", "shape"]), data=st.data())
def test_hf_missing_extra_or_misshapen_tensor_is_named(scratch, hf_dir, change, data):
    from lmadapt.hf import BUFFERS

    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    if change == "drop":
        name = data.draw(st.sampled_from(sorted(state)), label="dropped")
        del state[name]
        needle = "missing tensor(s) " + name
    elif change == "extra":
        name = data.draw(st.from_regex(r"(model|lm_head|transformer)\.[a-z0-9_.]{1,30}", fullmatch=True)
                         | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20),
                         label="extra")
        assume(name not in state and not BUFFERS.match(name))
        state[name] = np.zeros(data.draw(st.sampled_from([(3,), (2, 2), ()])), np.float32)
        needle = "unexpected tensor(s) " + (name if name.isprintable() else repr(name))  # '\x85' is a line break
    else:
        name = data.draw(st.sampled_from(sorted(state)), label="reshaped")
        shape = list(state[name].shape)
        how = data.draw(st.sampled_from(["grow", "shrink", "add_dim", "drop_dim"]))
        i = data.draw(st.integers(0, len(shape) - 1))
        if how == "grow":
            shape[i] += data.draw(st.integers(1, 3))
        elif how == "shrink":
            shape[i] -= data.draw(st.integers(1, shape[i]))
        elif how == "add_dim":
            shape.insert(i, data.draw(st.integers(1, 3)))
        else:
            assume(len(shape) > 1)
            shape.pop(i)
        expected = tuple(state[name].shape)
        state[name] = np.zeros(shape, np.float32)
        needle = f"tensor {name}: shape {tuple(shape)}, expected {expected}"
    with scratch() as d:
        assert_hf_refused(d, mutated_copy(hf_dir, d, state), needle)


HF_KEYS = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
           "intermediate_size", "max_position_embeddings", "head_dim", "rms_norm_eps", "model_type", "architectures",
           "hidden_act", "rope_scaling", "tie_word_embeddings"]


@fuzz(12)
@given(key=st.sampled_from(HF_KEYS), value=st.one_of(st.just("<missing>"), SCALARS, st.integers(1, 600)))
def test_hf_config_json_loads_or_names_the_key_or_tensor(scratch, hf_dir, key, value):
    from lmadapt.hf import HFError, import_hf

    with scratch() as d:
        path = os.path.join(d, "hf")
        shutil.copytree(hf_dir, path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        if value == "<missing>":
            config.pop(key, None)
        else:
            config[key] = value
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        try:
            import_hf(path)
        except HFError as e:
            assert_one_line(str(e), path)
            assert key in str(e) or "tensor" in str(e), str(e)


@fuzz(10)
@given(cut=st.integers(0, 10**6), garbage=st.binary(max_size=64))
def test_hf_truncated_or_foreign_weights_file(scratch, hf_dir, cut, garbage):
    with scratch() as d:
        path = os.path.join(d, "hf")
        shutil.copytree(hf_dir, path)
        weights = os.path.join(path, "model.safetensors")
        with open(weights, "rb") as f:
            blob = f.read()
        with open(weights, "wb") as f:
            f.write(blob[:cut % len(blob)] + garbage if garbage else blob[:cut % len(blob)])
        assert_hf_refused(d, path, weights)


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, **changes}, f)


def reshard(path: str, state: dict, shards: dict[str, list[str]], weight_map: dict | None = None) -> None:
    """Replace model.safetensors by `shards` (file -> tensor names) and an index (default: what they hold)."""
    os.remove(os.path.join(path, "model.safetensors"))
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, os.path.join(path, shard), metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {k: shard for shard, names in shards.items() for k in names}
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _bad_hf_dir(hf_dir: str, d: str, case: str) -> tuple[str, list[str]]:
    """A copy of the tiny HF directory broken as `case` says; (its path, what the error must name)."""
    path = os.path.join(d, "hf")
    shutil.copytree(hf_dir, path)
    state = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    if case == "model_type":
        edit_config(path, model_type="mixtral", architectures=["MixtralForCausalLM"])
        return path, ["config.json", "model_type 'mixtral' is not supported"]
    if case == "option":
        edit_config(path, rope_scaling={"rope_type": "longrope", "factor": 4.0})
        return path, ["config.json", "rope_scaling.rope_type='longrope' is not supported"]
    if case == "quantized":
        edit_config(path, quantization_config={"quant_method": "gptq", "bits": 4})
        return path, ["config.json", "quantization_config", "quantized"]
    if case == "tokenizer_vocab":
        from lmadapt.data.tokenizers import save_hf_tokenizer, train_bpe

        os.remove(os.path.join(path, "tokenizer.bytes"))
        for name in os.listdir(path):
            if name.startswith(("tokenizer", "special_tokens")) or name.endswith(".json") and "export" in name:
                os.remove(os.path.join(path, name))
        tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 40], 300)
        save_hf_tokenizer(tok, path)
        return path, [f"the tokenizer has {tok.vocab_size} tokens", "vocab_size=260"]
    if case == "missing_shard":
        reshard(path, state, halves)
        os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
        return path, ["model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors' is not a file"]
    if case == "index_names_missing_tensor":
        reshard(path, state, halves, {**{k: s for s, ks in halves.items() for k in ks},
                                      "model.layers.0.mlp.extra.weight": "model-00001-of-00002.safetensors"})
        return path, ["model.safetensors.index.json", "model.layers.0.mlp.extra.weight listed but not in any shard"]
    if case == "shard_with_path":
        reshard(path, state, {"model-00001-of-00001.safetensors": names},
                {k: "../model-00001-of-00001.safetensors" for k in names})
        return path, ["shard name '../model-00001-of-00001.safetensors' is not a plain file name"]
    if case == "duplicate":
        shards = {"model-00001-of-00002.safetensors": names, "model-00002-of-00002.safetensors": names[:1]}
        reshard(path, state, shards, {k: "model-00001-of-00002.safetensors" for k in names}
                | {names[0]: "model-00002-of-00002.safetensors"})
        return path, [f"tensor {names[0]} is stored twice"]
    code = case  # a quantized dtype: one tensor stored as I8 / U8 / F8_*
    name = "model.layers.0.mlp.up_proj.weight"
    raw = {k: ("F32", v.shape, v.astype(np.float32).tobytes()) for k, v in state.items()}
    raw[name] = (code, state[name].shape, np.zeros(state[name].size, np.uint8).tobytes())
    os.remove(os.path.join(path, "model.safetensors"))
    write_raw_safetensors(os.path.join(path, "model.safetensors"), raw)
    return path, ["model.safetensors", f"tensor {name} has dtype {code}"]


@pytest.mark.parametrize("case", ["model_type", "option", "quantized", "tokenizer_vocab", "missing_shard",
                                  "index_names_missing_tensor", "shard_with_path", "duplicate", "I8", "U8",
                                  "F8_E4M3", "F8_E5M2"])
def test_hf_directory_refused_by_name_before_anything_is_written(tmp_path, hf_dir, case):
    """Unsupported architectures and options, a tokenizer bigger than the vocabulary, broken shard sets and
    quantized tensors: one line from import_hf, train.py and tools/lineage.py import-hf, and no lineage."""
    d = str(tmp_path)
    path, needles = _bad_hf_dir(hf_dir, d, case)
    assert_hf_refused(d, path, *needles)


def test_hf_directory_without_a_tokenizer(tmp_path, hf_dir):
    """No tokenizer: import-hf and a run on the bytes default refuse naming the directory (a 128k-vocab model
    with a byte tokenizer is a silent wrong result); an explicit tokenizer.path is used instead."""
    d = str(tmp_path)
    path = os.path.join(d, "hf")
    shutil.copytree(hf_dir, path)
    for name in os.listdir(path):
        if name not in ("config.json", "model.safetensors", "generation_config.json"):
            os.remove(os.path.join(path, name))
    lin = os.path.join(d, "lineage")
    refused(lineage_tool.main, ["--dir", lin, "import-hf", path], [d], path, "no usable tokenizer")
    refused(train.main, base_args(d, f"init.from_hf={path}", f"lineage.dir={lin}"), [d], "init.from_hf", path,
            "no usable tokenizer", "tokenizer.path")
    assert not os.path.exists(lin)
    from lmadapt.data.tokenizers import save_hf_tokenizer, train_bpe

    tok_dir = os.path.join(d, "tok")
    os.mkdir(tok_dir)
    save_hf_tokenizer(train_bpe(["an explicit tokenizer " * 20], 260), tok_dir)
    rc, err = call(train.main, ["--dry-run", *base_args(d, f"init.from_hf={path}", "train.seq_len=32",
                                                        "tokenizer.kind=hf", f"tokenizer.path={tok_dir}")])
    assert rc == 0, err


def test_seq_len_over_an_imported_models_maximum(tmp_path, hf_dir):
    d = str(tmp_path)  # the HF model says max_position_embeddings=32; tiny.yaml trains rows of 64
    refused(train.main, ["--dry-run", *base_args(d, f"init.from_hf={hf_dir}")], [d, hf_dir], "train.seq_len")


def test_dry_run_from_hf_writes_nothing_to_the_lineage(tmp_path, hf_dir):
    lin = str(tmp_path / "lin")
    os.mkdir(lin)
    rc, err = call(train.main, ["--dry-run", *base_args(str(tmp_path), f"init.from_hf={hf_dir}", f"lineage.dir={lin}",
                                                        "train.seq_len=32", "mesh.data=8")])
    assert rc == 0, err
    assert os.listdir(lin) == []  # a real run imports the weights as a root version; a dry run must not


def test_a_tokenizer_path_other_than_the_versions_is_refused(tmp_path, lineage_dir):
    """A run from a version keeps its tokenizer; naming another one is an error, not silently ignored."""
    from lmadapt.data.tokenizers import train_bpe

    other = str(tmp_path / "other")
    os.mkdir(other)
    train_bpe(["some other text, 123\n" * 50], 300).save(other)
    args = base_args(str(tmp_path), f"lineage.dir={lineage_dir}", "init.from_version=v1", "train.seq_len=32")
    refused(train.main, ["--dry-run", *args, "tokenizer.kind=bpe", f"tokenizer.path={other}"], [lineage_dir],
            "tokenizer.path=", "is not the tokenizer of version 'v1'")
    rc, err = call(train.main, ["--dry-run", *args, "tokenizer.kind=hf", f"tokenizer.path={lineage_dir}/versions/v1"])
    assert rc == 0, err  # its own tokenizer, named explicitly, is fine



def test_export_onto_an_occupied_target_is_refused_before_reading_params(tmp_path, lineage_dir, monkeypatch):
    """A file, a non-empty directory or a dangling symlink at --out: one line, nothing written, and the params
    are not read first (minutes for a large model). --format safetensors never overwrites a file either."""
    from lmadapt.lineage.store import Lineage

    d = str(tmp_path)
    os.mkdir(os.path.join(d, "full"))
    write_bytes(os.path.join(d, "full"), "keep.txt", b"keep")
    write_bytes(d, "file.safetensors", b"keep")
    os.symlink(os.path.join(d, "nowhere"), os.path.join(d, "dangling"))
    real_load = Lineage.load_params
    monkeypatch.setattr(Lineage, "load_params", lambda *a, **k: pytest.fail("params read before the target check"))
    for target, fmt in (("full", "hf"), ("file.safetensors", "hf"), ("full", "safetensors"),
                        ("file.safetensors", "safetensors"), ("dangling", "safetensors")):
        refused(lineage_tool.main, ["--dir", lineage_dir, "export", "v1", "--out", os.path.join(d, target),
                                    "--format", fmt], [os.path.join(d, "full"), os.path.join(d, "file.safetensors"),
                                                       lineage_dir], target, "refusing to overwrite")
    assert sorted(os.listdir(d)) == ["dangling", "file.safetensors", "full"] and not os.path.exists(
        os.path.join(d, "nowhere"))
    monkeypatch.setattr(Lineage, "load_params", real_load)
    # A symlink to an empty or not yet existing directory is followed, as cp and save_pretrained do.
    os.symlink(os.path.join(d, "elsewhere"), os.path.join(d, "link"))
    rc, err = call(lineage_tool.main, ["--dir", lineage_dir, "export", "v1", "--out", os.path.join(d, "link")])
    assert rc == 0, err
    assert os.path.isfile(os.path.join(d, "elsewhere", "config.json")) and os.path.islink(os.path.join(d, "link"))
    rc, err = call(lineage_tool.main, ["--dir", lineage_dir, "export", "v1", "--out", os.path.join(d, "dump"),
                                       "--format", "safetensors"])
    assert rc == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(d, "dump")).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(os.listdir(d)) == ["dangling", "dump", "elsewhere", "file.safetensors", "full", "link"]

# ---- The command line: a few real subprocesses -------------------------------------------------------------------


def test_cli_binary_data_and_broken_hf_dir(tmp_path, hf_dir):
    d = str(tmp_path)
    path = write_bytes(d, "data.bin", b"PK\x03\x04\0\0binary")
    os.mkdir(os.path.join(d, "lin"))
    shutil.copytree(hf_dir, os.path.join(d, "hf"))
    os.remove(os.path.join(d, "hf", "model.safetensors"))
    before = snapshot(d)
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}"}
    for cmd, needles in [(["train.py", *data_args(d, path)], [path, "NUL byte at offset 4"]),
                         (["eval.py", "--hf", os.path.join(d, "hf"), "--config", TINY], ["no model.safetensors"]),
                         (["tools/lineage.py", "--dir", os.path.join(d, "lin"), "show", "../x"], ["'../x'"])]:
        result = run_cmd(cmd, env=env)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert_one_line(lines[0], *needles)
    assert snapshot(d) == before
