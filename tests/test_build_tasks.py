"""tools/build_tasks.py: the example task suite's files load, every answer is the original text, distractors are
wrong, a rebuild is byte-identical, the shipped data/tasks files are what the builder gives (no drift), and an
existing different file is refused without --force."""

import importlib.util
import json
import os

import pytest
import yaml
from tests_paths import ROOT

from lmadapt.eval.task_report import load_tasks, read_suite
from lmadapt.eval.tasks import load_task

_spec = importlib.util.spec_from_file_location("build_tasks_tool", os.path.join(ROOT, "tools", "build_tasks.py"))
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)

SHIPPED = os.path.join(ROOT, "data", "tasks")
SUITE = os.path.join(ROOT, "configs", "eval", "tasks.yaml")
FORMATS = {"shakespeare_cloze": "generate", "shakespeare_next_line": "multiple_choice",
           "python_docs_next_line": "multiple_choice", "debian_section": "multiple_choice"}


@pytest.fixture(scope="module")
def built():
    return bt.build_files()


@pytest.fixture(scope="module")
def sources():
    """{task: (held-out text, few-shot documents' text)} and the Debian (text, label) pairs."""
    docs = bt.quickstart_documents()
    text = {}
    for task, src in (("shakespeare_cloze", "shakespeare"), ("shakespeare_next_line", "shakespeare"),
                      ("python_docs_next_line", "python_docs")):
        split = bt.split_for_tasks(*docs[src], src)
        text[task] = ("\n" + "\n".join(split.val) + "\n", "\n" + "\n".join(split.fewshot) + "\n", split.trained)
    return text, {(r["text"], r["label"]) for r in bt.debian_records()}


def test_shipped_files_are_what_the_builder_builds(built):
    assert sorted(f for f in os.listdir(SHIPPED) if f.endswith(".jsonl")) == sorted(built)
    for name, data in built.items():
        with open(os.path.join(SHIPPED, name), "rb") as f:
            assert f.read() == data, f"data/tasks/{name} drifted: run python tools/build_tasks.py --force"


def test_a_rebuild_writes_byte_identical_files(tmp_path, built):
    assert bt.main(["--out", str(tmp_path)]) == 0
    assert {n: (tmp_path / n).read_bytes() for n in built} == built
    assert bt.stale(built, str(tmp_path)) == [] and bt.write_files(built, str(tmp_path)) == []  # --check's test
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # atomic writes leave no temp file


def test_files_are_small_utf8_json_lines_that_load(built):
    for name, data in built.items():
        task = name.split(".")[0]
        count = bt.COUNTS[task][name.endswith(".fewshot.jsonl")]
        text = data.decode("utf-8")
        assert len(data) <= 60_000 and text.count("\n") == count and text.endswith("\n")
        assert len(text.splitlines()) == count and "\r" not in text  # no splitter cuts a record
        assert bt.encode([json.loads(line) for line in text.splitlines()]) == data  # lossless round trip
    for task, fmt in FORMATS.items():
        pool = os.path.join(SHIPPED, f"{task}.fewshot.jsonl")
        loaded = load_task(task, os.path.join(SHIPPED, f"{task}.jsonl"), fmt, num_fewshot=2, fewshot_path=pool)
        assert len(loaded.examples) == bt.COUNTS[task][0] and loaded.prompt(0).count("\n\n") >= 2


def test_every_answer_is_the_original_text_and_every_distractor_is_wrong(built, sources):
    text, debian = sources
    for name, data in built.items():
        task, fewshot = name.split(".")[0], name.endswith(".fewshot.jsonl")
        records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        for r in records:
            if task == "shakespeare_cloze":
                (answer,) = r["answers"]
                assert " " not in answer and answer[-1] in ".,;:!?" and answer.rstrip(".,;:!?").isascii()
                whole = r["prompt"] + " " + answer
                assert "\n" + whole + "\n" in text[task][fewshot]  # whole lines of the source, verbatim
                assert fewshot or bt._norm(whole.split("\n")[-1]) not in text[task][2]  # never trained on
                continue
            choices, k = r["choices"], r["answer"]
            assert len(choices) == 4 and 0 <= k < 4 and len({bt._norm(c) for c in choices}) == 4
            if task == "debian_section":
                assert r["context"].startswith("Description: ") and r["context"].endswith("\nSection:")
                desc = r["context"][len("Description: "):-len("\nSection:")]
                assert (desc, choices[k]) in debian and all((desc, c) not in debian for c in choices if c != choices[k])
                continue
            whole = r["context"] + " " + choices[k]
            assert "\n" + whole + "\n" in text[task][fewshot]
            assert fewshot or bt._norm(whole.split("\n")[-1]) not in text[task][2]
            assert all(r["context"] + " " + c + "\n" not in text[task][fewshot] for c in choices if c != choices[k])
        if task != "shakespeare_cloze":  # the right answer is not always in one place
            spots = {r["answer"] for r in records}
            assert len(spots) == 4 or fewshot


def test_the_suite_config_names_the_shipped_files():
    suite = read_suite(SUITE)
    assert [t.name for t in suite] == list(FORMATS)
    for cfg, task in load_tasks(suite):
        assert cfg.format == FORMATS[cfg.name] and cfg.path == f"data/tasks/{cfg.name}.jsonl"
        assert cfg.fewshot_path == f"data/tasks/{cfg.name}.fewshot.jsonl" and task.fewshot_pool
    with open(SUITE, encoding="utf-8") as f:
        keys = {k for t in yaml.safe_load(f)["eval"]["tasks"] for k in t}
    assert keys <= {"name", "path", "format", "num_fewshot", "fewshot_path", "seed", "max_new_tokens", "stop"}


def test_a_different_existing_file_is_refused_unless_forced(tmp_path):
    files = {"a.jsonl": bt.encode([{"prompt": "caf\u00e9 \u2028 x", "answers": ["y"]}]), "b.jsonl": b"{}\n"}
    assert b"\\u2028" in files["a.jsonl"] and "\u00e9".encode() in files["a.jsonl"]  # kept, but escaped
    (tmp_path / "b.jsonl").write_bytes(b"changed by hand\n")
    with pytest.raises(bt.BuildError, match="b.jsonl"):
        bt.write_files(files, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl"]  # nothing written, not even the new file
    assert bt.write_files(files, str(tmp_path), force=True) == ["a.jsonl", "b.jsonl"]
    assert bt.write_files(files, str(tmp_path)) == []  # identical files are left alone
    assert load_task("a", str(tmp_path / "a.jsonl"), "generate").examples[0].text == "caf\u00e9 \u2028 x"
