"""tensorflow-datasets support without TensorFlow: build a dataset from local text files, read it back, errors."""

import gzip
import importlib.util
import json
import lzma
import os

import pytest

from helpers import run_cmd
from lmadapt.data import DataError
from lmadapt.data.tfds_builder import prepare_text_dataset
from lmadapt.data.tfds_source import read_tfds_texts

# Sorted by file name, which is the order the builder stores documents in (it does not shuffle).
DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "b.txt": "Second document, with a blank line\n\nin the middle.\n",
    "c.txt.xz": "Troisième document: non-ASCII text, compressed.\n",
}


def write_sources(directory) -> list[str]:
    """The three DOCS files (c compressed with xz) in `directory`; returns their paths in name order."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, text in DOCS.items():
        path = os.path.join(directory, name)
        data = text.encode("utf-8")
        with open(path, "wb") as f:
            f.write(lzma.compress(data) if name.endswith(".xz") else data)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One dataset `tiny_corpus:1.0.0` from DOCS, shared by the read tests: (data_dir, dataset_dir)."""
    root = tmp_path_factory.mktemp("tfds")
    write_sources(root / "src")
    data_dir = str(root / "tfds")
    dataset_dir = prepare_text_dataset("tiny_corpus", [str(root / "src" / "*.txt"), str(root / "src" / "c.txt.xz")],
                                       data_dir)
    return data_dir, dataset_dir


def test_tensorflow_is_not_installed():
    # Everything else here then proves the no-TensorFlow path.
    assert importlib.util.find_spec("tensorflow") is None


def test_build_and_read_back(built):
    data_dir, dataset_dir = built
    assert dataset_dir == os.path.join(os.path.abspath(data_dir), "tiny_corpus", "1.0.0")
    texts, fp = read_tfds_texts("tiny_corpus", "train", "text", data_dir)
    assert texts == list(DOCS.values())  # in file order: the builder stores documents unshuffled
    assert fp["kind"] == "tfds" and fp["name"] == "tiny_corpus" and fp["version"] == "1.0.0"
    assert fp["split"] == "train" and fp["feature"] == "text" and fp["num_examples"] == 3
    assert [f["name"] for f in fp["files"]] == ["tiny_corpus-train.array_record-00000-of-00001"]
    assert all(f["bytes"] > 0 for f in fp["files"])
    assert read_tfds_texts("tiny_corpus:1.0.0", "train", "text", data_dir) == (texts, fp)
    with open(os.path.join(dataset_dir, "metadata.json")) as f:
        sources = json.load(f)["source_files"]
    assert [os.path.basename(s["path"]) for s in sources] == list(DOCS)


def test_latest_version_is_read_by_default(tmp_path):
    src, data_dir = write_sources(tmp_path / "src"), str(tmp_path / "tfds")
    prepare_text_dataset("versioned", src, data_dir, version="1.0.0")
    prepare_text_dataset("versioned", src[:1], data_dir, version="1.1.0")
    assert read_tfds_texts("versioned", "train", "text", data_dir)[1]["version"] == "1.1.0"
    assert read_tfds_texts("versioned:1.0.0", "train", "text", data_dir)[1]["num_examples"] == 3


def test_blank_line_documents(tmp_path):
    src = tmp_path / "notes.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n\none\nstill one\n \n\ntwo\r\n\nthree\n")
    prepare_text_dataset("notes", [str(src)], str(tmp_path / "tfds"), documents="blank_line")
    texts, _ = read_tfds_texts("notes", "train", "text", str(tmp_path / "tfds"))
    assert texts == ["one\nstill one", "two", "three"]


def test_validation_split_is_held_out(tmp_path):
    src = tmp_path / "docs.txt"
    docs = [f"document {i}" for i in range(20)]
    src.write_text("\n\n".join(docs) + "\n")

    def build(seed: int, where: str) -> tuple[list[str], list[str]]:
        data_dir = str(tmp_path / where)
        prepare_text_dataset("held", [str(src)], data_dir, documents="blank_line", val_fraction=0.25, seed=seed)
        return (read_tfds_texts("held", "train", "text", data_dir)[0],
                read_tfds_texts("held", "validation", "text", data_dir)[0])

    train, val = build(3, "a")
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert build(3, "b") == (train, val)  # the held-out draw is a function of the seed
    assert build(4, "c")[1] != val


def test_cli_builds_and_refuses_to_overwrite(tmp_path):
    write_sources(tmp_path / "src")
    data_dir = str(tmp_path / "tfds")
    args = ["tools/prepare_data.py", "--name", "cli_corpus", "--version", "2.0.0", "--data-dir", data_dir,
            "--val-fraction", "0.34", "--seed", "1", str(tmp_path / "src" / "*.txt*")]
    result = run_cmd(args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [os.path.join(data_dir, "cli_corpus", "2.0.0"), "train: 2 examples",
                                          "validation: 1 examples"]
    again = run_cmd(args)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "cli_corpus:2.0.0 already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_cli_no_files_matched(tmp_path):
    result = run_cmd(["tools/prepare_data.py", "--name", "empty", "--data-dir", str(tmp_path / "tfds"),
                      str(tmp_path / "nothing" / "*.txt")])
    assert result.returncode == 2
    assert result.stderr.startswith("error: no files matched") and "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "split", "feature", "message"), [
    ("missing", "train", "text", "tfds dataset 'missing' is not prepared in {data_dir} (datasets there: "
                                 "tiny_corpus:1.0.0)"),
    ("tiny_corpus:9.0.0", "train", "text", "'tiny_corpus:9.0.0' is not prepared"),
    ("tiny_corpus:1.0.0", "test", "text", "split 'test' not found in tfds dataset tiny_corpus:1.0.0; available splits: "
                                          "train"),
    ("tiny_corpus:1.0.0", "train", "content", "feature 'content' not found in tfds dataset tiny_corpus:1.0.0; "
                                              "available features: text"),
])
def test_read_errors(built, name, split, feature, message):
    data_dir, _ = built
    with pytest.raises(DataError) as e:
        read_tfds_texts(name, split, feature, data_dir)
    assert message.format(data_dir=data_dir) in str(e.value)


def test_read_error_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="data_dir .*nowhere does not exist"):
        read_tfds_texts("tiny_corpus", "train", "text", str(tmp_path / "nowhere"))


def test_tfrecord_dataset_without_tensorflow_is_refused(tmp_path):
    # No TensorFlow to write tfrecords with, so relabel an ArrayRecord dataset: the reader goes by the label.
    dataset_dir = prepare_text_dataset("old_format", write_sources(tmp_path / "src"), str(tmp_path / "tfds"))
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(DataError, match="stored as tfrecord, which needs TensorFlow.*file_format='array_record'"):
        read_tfds_texts("old_format", "train", "text", str(tmp_path / "tfds"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"files": ["{src}/*.md"]}, "no files matched '{src}/*.md'"),
    ({"files": ["{src}/missing.txt"]}, "no files matched '{src}/missing.txt' (no such file)"),
    ({"files": ["{src}"]}, "is a directory"),
    ({"name": "My-Corpus"}, "bad dataset name 'My-Corpus'"),
    ({"name": "mnist"}, "taken by the tensorflow-datasets catalog"),
    ({"version": "1.0"}, "bad version '1.0'"),
    ({"documents": "line"}, "documents must be one of file, blank_line"),
    ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
    ({"files": ["{src}/a.txt"], "val_fraction": 0.5}, "leaves no training documents"),
])
def test_prepare_errors(tmp_path, kwargs, message):
    src = os.path.dirname(write_sources(tmp_path / "src")[0])
    args = {"name": "ok_name", "files": ["{src}/*.txt"], "data_dir": str(tmp_path / "tfds"), **kwargs}
    args["files"] = [f.format(src=src) for f in args["files"]]
    with pytest.raises(DataError) as e:
        prepare_text_dataset(**args)
    assert message.format(src=src) in str(e.value)
    assert not os.path.exists(tmp_path / "tfds" / "ok_name")


def test_prepare_refuses_existing_version(built):
    data_dir, dataset_dir = built
    with pytest.raises(DataError, match="tiny_corpus:1.0.0 already exists .* refusing to overwrite"):
        prepare_text_dataset("tiny_corpus", ["unused.txt"], data_dir)


def test_bad_utf8_names_file_and_line(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine\n\nstill fine\n\xff broken\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 4: not valid UTF-8"):
        prepare_text_dataset("broken", [str(src)], str(tmp_path / "tfds"), documents="blank_line")
