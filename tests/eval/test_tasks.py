"""Capability tasks: multiple-choice and generation metrics against hand-computed values, packed log-likelihoods
against one-by-one and against a plain forward pass, few-shot prompts, and bad task files named in one line."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests_paths import TINY

from helpers import assert_one_line
from lmadapt.config import ConfigError, TaskConfig, load_config
from lmadapt.data.tokenizers import ByteTokenizer
from lmadapt.eval.loglik import _rows, encode_pair, loglikelihoods
from lmadapt.eval.task_report import evaluate_tasks, load_tasks
from lmadapt.eval.task_scoring import choice_metrics, exact_match, normalize_answer, score_multiple_choice, token_f1
from lmadapt.eval.tasks import TaskError, load_task
from lmadapt.lineage.store import Lineage
from lmadapt.model import Transformer, init_params, per_layer
from lmadapt.trainer import train


def test_acc_acc_norm_and_acc_bytes_by_hand():
    # ex0: acc takes "a" (-2 > -4); per character "bbbb" wins (-1 > -2): only acc_norm is right.
    # ex1: both right. ex2: per character "ab" wins (-1.5 > -2), per byte "é" (2 bytes: -1 > -1.5) does not.
    lls = [[-2.0, -4.0], [-1.0, -3.0], [-2.0, -3.0]]
    choices = [["a", "bbbb"], ["yes", "no"], ["é", "ab"]]
    out = choice_metrics(lls, choices, [1, 0, 1])
    assert out["acc"] == pytest.approx(1 / 3) and out["acc_norm"] == 1.0 and out["acc_bytes"] == pytest.approx(2 / 3)
    assert out["predictions"] == [0, 0, 0]


def test_exact_match_and_f1_by_hand():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("An apple.", ["pear", "apple"]) == 1.0 and exact_match("apples", ["apple"]) == 0.0
    assert token_f1("the big cat", ["cat"]) == pytest.approx(2 / 3)  # p = 1/2, r = 1
    assert token_f1("big red cat", ["small cat", "red cat big"]) == 1.0  # the best answer counts
    assert token_f1("", ["cat"]) == 0.0 and token_f1("dog", ["cat"]) == 0.0


@pytest.fixture(scope="module")
def tiny():
    cfg = per_layer(load_config(TINY).model)  # the layout versions load in
    params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.PRNGKey(3))  # jitted: seconds faster
    return cfg, params, ByteTokenizer()


def test_packed_loglikelihoods_equal_one_by_one_and_a_plain_forward(tiny):
    cfg, params, tok = tiny
    requests = [("The sky is", " blue"), ("Once upon a time ", "there was"), ("", "x"), ("ab", "cdefgh"),
                ("A much longer context, so that rows hold different numbers of requests.", " Yes")]
    assert _rows([10, 20, 30, 40, 50], 64) == [[4, 0], [3, 1], [2]]  # first fit, longest first
    packed = loglikelihoods(params, cfg, tok, requests, width=64)
    alone = loglikelihoods(params, cfg, tok, requests, width=64, pack=False)
    for p, a in zip(packed, alone, strict=True):
        np.testing.assert_allclose(p.logprob, a.logprob, rtol=1e-5, atol=1e-5)
        assert p.greedy == a.greedy and p.tokens == a.tokens
    # The reference: one sequence through the model, log-softmax, the continuation's targets summed.
    ctx, cont = encode_pair(tok, *requests[1])
    assert (ctx, cont) == ([tok.bos_id, *b"Once upon a time"], list(b" there was"))  # the space moved over
    seq = jnp.asarray([ctx + cont], jnp.int32)
    logp = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, seq[:, :-1]).astype(jnp.float32))
    want = float(jnp.sum(jnp.take_along_axis(logp[0], seq[0, 1:, None], axis=-1)[-len(cont):]))
    np.testing.assert_allclose(packed[1].logprob, want, rtol=1e-5)


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


MC = [{"context": f"Q{i}:", "choices": ["red", "green", "blue"], "answer": i % 3} for i in range(6)]


def test_fewshot_prompts_are_fixed_and_laid_out_as_the_harness(tmp_path, tiny):
    path = write(tmp_path / "mc.jsonl", MC)
    a, b = load_task("colours", path, "multiple_choice", num_fewshot=2), load_task("colours", path,
                                                                                 "multiple_choice", num_fewshot=2)
    assert [a.prompt(i) for i in range(6)] == [b.prompt(i) for i in range(6)] and a.fingerprint == b.fingerprint
    shots = a.prompt(0).split("\n\n")
    assert len(shots) == 3 and shots[-1] == "Q0:" and all(s.count(":") == 1 for s in shots)
    for shot in shots[:2]:  # a solved example: its context, the delimiter, its answer; never the example itself
        ctx, answer = shot.split(" ")
        assert ctx != "Q0:" and answer == ["red", "green", "blue"][int(ctx[1]) % 3]
    assert load_task("colours", path, "multiple_choice", num_fewshot=2, seed=7).fingerprint != a.fingerprint
    cfg, params, tok = tiny
    out = score_multiple_choice(params, cfg, tok, a)
    assert out["examples"] == 6 and 0 <= out["acc"] <= 1 and len(out["confusion_matrix"]) == 3


@pytest.mark.parametrize("record, needle", [
    ({"context": "q", "answer": 0}, "missing field 'choices'"),
    ({"context": "q", "choices": ["a", "b"], "answer": 2}, "field 'answer' has value 2; expected an index"),
    ({"context": "q", "choices": [], "answer": 0}, "field 'choices' has value []; expected a non-empty list"),
    ('{"context": "q", "choices": ["a"], "answer": 0', "not JSON"),
    (["q"], "expected a JSON object, got list"),
])
def test_bad_task_files_are_named_with_their_line(tmp_path, record, needle):
    path = write(tmp_path / "bad.jsonl", [MC[0], record])
    with pytest.raises(TaskError) as e:
        load_task("bad", path, "multiple_choice")
    assert_one_line(str(e.value), f"{path}:2:", needle)


def test_unknown_format_and_missing_file_are_named(tmp_path):
    with pytest.raises(TaskError) as e:
        load_task("t", write(tmp_path / "t.jsonl", MC), "cloze")
    assert_one_line(str(e.value), "task 't'", "unknown format 'cloze'", "multiple_choice, generate")
    with pytest.raises(TaskError) as e:
        load_task("t", str(tmp_path / "absent.jsonl"), "generate")
    assert_one_line(str(e.value), str(tmp_path / "absent.jsonl"))
    # In a run config the task is named by its key: the run is refused before anything is built.
    with pytest.raises(ConfigError) as e:
        load_tasks((TaskConfig(name="t", path=str(tmp_path / "absent.jsonl")),))
    assert_one_line(str(e.value), "eval.tasks.0 (t)", str(tmp_path / "absent.jsonl"))


def test_tasks_are_scored_during_training_published_and_cached(tmp_path, tiny_config):
    path = write(tmp_path / "mc.jsonl", MC)
    cfg = tiny_config(f"run.dir={tmp_path / 'run'}", f"lineage.dir={tmp_path / 'lin'}", "version.id=v0",
                      "train.steps=2", "eval.every=1", "logging.every=1", "checkpoint.every=0", "mesh.data=1",
                      "logging.progress=false", f"eval.tasks=[{{name: colours, path: {path}, num_fewshot: 1}}]")
    train(cfg, log=lambda s: None, devices=jax.devices()[:1])
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        logged = [r for r in map(json.loads, f) if "eval/tasks/colours/acc" in r]
    assert [r["step"] for r in logged] == [1, 2] and all(0 <= r["eval/tasks/colours/acc_norm"] <= 1 for r in logged)
    lineage = Lineage(str(tmp_path / "lin"))
    assert lineage.record("v0")["metrics"]["eval/tasks/colours/acc"] == logged[-1]["eval/tasks/colours/acc"]
    tasks = load_tasks(cfg.eval.tasks)
    lines = []
    first = evaluate_tasks(lineage, ["v0"], tasks, log=lines.append)
    # The published version scores as the trained state did; the second evaluation reads the lineage.
    assert first[0]["acc"] == logged[-1]["eval/tasks/colours/acc"] and len(lines) == 1
    again = evaluate_tasks(lineage, ["v0"], tasks, log=lines.append)
    assert again[0]["acc"] == first[0]["acc"] and len(lines) == 1
