"""lm-evaluation-harness adapter (lmadapt.eval.harness), offline on a tiny version: a local JSONL multiple-choice
task scores exactly as lmadapt's own scorer, log-likelihoods (pairs and rolling windows) match transformers on the
exported weights, generation stops at `until`, and an unknown task name is one line naming it."""

import importlib.util
import json
import sys

import datasets.config
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

import lmadapt.eval.harness as harness
from helpers import TINY_MODEL, assert_one_line
from lmadapt.data.tokenizers import ByteTokenizer
from lmadapt.eval.harness import HarnessError, LmadaptLM, run_harness
from lmadapt.eval.loglik import loglikelihoods
from lmadapt.eval.task_scoring import score_multiple_choice
from lmadapt.eval.tasks import load_task
from lmadapt.hf import export_hf
from lmadapt.lineage.store import Lineage
from lmadapt.model import init_params

BOS = ByteTokenizer.bos_id
MC = [{"context": "The sky is", "choices": ["blue", "green", "a very long answer"]},
      {"context": "Two plus two is", "choices": ["four", "five"]},
      {"context": "Question: which animal barks?\nAnswer:", "choices": ["dog", "cat", "cow", "owl"]},
      {"context": "Once upon a", "choices": ["time", "midnight dreary"]},
      {"context": "x", "choices": ["y", "z", "yz"]}]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


class Request:  # what the harness hands a model: an Instance's `args`
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Nothing reaches the network or writes to ~/.cache (datasets caches the JSONL as arrow files); module-wide,
    so the module fixtures below run under it too."""
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}.items():
            mp.setenv(key, value)
        # datasets reads its settings when imported (above): patched as well as the environment
        for key, value in {"HF_DATASETS_CACHE": home / "datasets", "HF_MODULES_CACHE": home / "modules",
                           "HF_DATASETS_OFFLINE": True, "HF_HUB_OFFLINE": True}.items():
            mp.setattr(datasets.config, key, value)
        yield


def random_params(seed):
    """Params of TINY_MODEL drawn with numpy, norm scales near 1: shapes from `jax.eval_shape`, so nothing is
    compiled (running `init_params` on 2 loaded cores takes longer than every test here). The output columns of
    every id but printable ASCII are zero, so greedy decoding emits only those: one character per token."""
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(TINY_MODEL, jax.random.PRNGKey(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["lm_head"]["kernel"][:, [i for i in range(TINY_MODEL.vocab_size) if not 32 <= i < 127]] = 0.0
    return params


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """(lineage dir, the adapter on its version v1)."""
    root = tmp_path_factory.mktemp("harness")
    params = random_params(7)
    Lineage(str(root / "lin")).publish("v1", params, TINY_MODEL, ByteTokenizer(), parents=[])
    lm = LmadaptLM.create_from_arg_string(f"lineage={root / 'lin'},version=v1", {"batch_size": 1})
    return str(root / "lin"), lm


@pytest.fixture(scope="module")
def hf_model(version, tmp_path_factory):
    """transformers' model on the version's exported weights (float32)."""
    _, lm = version
    out = export_hf(str(tmp_path_factory.mktemp("hf") / "v1"), lm.params, lm.model_cfg, ByteTokenizer())
    return transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()


def hf_logprobs(model, inputs, targets):
    """log p(targets[i] | inputs[:i + 1]) per position, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([inputs])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()


def test_harness_acc_equals_lmadapt_multiple_choice(version, tmp_path):
    lineage, lm = version
    # Answers chosen from lmadapt's own log-likelihoods so that acc is 3/5, not a degenerate 0 or 1: examples
    # 0, 2, 4 answered with the best choice, 1 and 3 with another one.
    pairs = [(e["context"], " " + c) for e in MC for c in e["choices"]]
    own = loglikelihoods(lm.params, lm.model_cfg, lm.tokenizer, pairs)
    # The adapter's numbers are lmadapt's own, bit for bit (the same packing and forward pass).
    assert lm.loglikelihood([Request(*p) for p in pairs]) == [(r.logprob, r.greedy) for r in own]
    lls = iter(r.logprob for r in own)
    records = []
    for i, e in enumerate(MC):
        best = int(np.argmax([next(lls) for _ in e["choices"]]))
        records.append({**e, "answer": best if i % 2 == 0 else (best + 1) % len(e["choices"])})
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(path=path), encoding="utf-8")

    got = run_harness(lineage, "v1", ["tiny_mc"], include_path=str(tmp_path / "tasks"), include_defaults=False)
    want = score_multiple_choice(lm.params, lm.model_cfg, lm.tokenizer, load_task("tiny_mc", str(path),
                                                                                  "multiple_choice"))
    assert want["acc"] == pytest.approx(0.6)
    assert (got["tiny_mc"]["acc"], got["tiny_mc"]["acc_norm"]) == (want["acc"], want["acc_norm"])
    assert got["tiny_mc"]["examples"] == len(MC)


def test_loglikelihood_equals_transformers_on_the_exported_weights(version, hf_model):
    _, lm = version
    requests = [("The sky is", " blue"), ("", "hello"), ("Once upon a time ", "there"), ("2+2=", "4"),
                ("a long context " * 6, "that is cut on the left")]  # 90 + 23 bytes > 64: the end is kept
    got = lm.loglikelihood([Request(*r) for r in requests])
    for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        spaces = len(context) - len(context.rstrip())  # the harness moves trailing spaces to the continuation
        ctx = [BOS, *context[:len(context) - spaces].encode()]
        cont = list((context[len(context) - spaces:] + continuation).encode())
        seq = (ctx + cont)[-(lm.max_length + 1):]
        logp = hf_logprobs(hf_model, seq[:-1], seq[1:])[-len(cont):]
        np.testing.assert_allclose(logprob, logp.sum(), rtol=0, atol=1e-4)
        with torch.no_grad():
            argmax = hf_model(torch.tensor([seq[:-1]])).logits[0, -len(cont):].argmax(-1).tolist()
        assert greedy == (argmax == cont)


def test_loglikelihood_rolling_sums_every_token_in_disjoint_windows(version, hf_model):
    _, lm = version
    short, long = "To be, or not to be", "".join(chr(97 + (i * 7) % 26) for i in range(100))
    got = lm.loglikelihood_rolling([Request(short), Request(long), Request("")])
    t = list(short.encode())
    np.testing.assert_allclose(got[0], hf_logprobs(hf_model, [BOS, *t[:-1]], t).sum(), rtol=0, atol=1e-4)
    # 100 tokens, 64 at most per window: the first predicts t[0:64] after BOS; the second predicts the other 36,
    # t[64:100], with the 64 tokens before each (inputs t[35:99]), scoring only those 36.
    t = list(long.encode())
    first = hf_logprobs(hf_model, [BOS, *t[:63]], t[:64]).sum()
    second = hf_logprobs(hf_model, t[35:99], t[36:100])[-36:].sum()
    np.testing.assert_allclose(got[1], first + second, rtol=0, atol=1e-4)
    assert got[2] == 0.0


def test_generate_until_stops_at_the_until_string_and_max_gen_toks(version):
    _, lm = version
    prompt = "Once upon a time"
    [free] = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 40})])
    assert len(free) == 40 and len(set(free)) > 1, free  # one character per token (random_params)
    stop = next(ch for ch in free if ch != free[0])  # its first occurrence is after the start
    [cut] = lm.generate_until([Request(prompt, {"until": ["never there", stop], "max_gen_toks": 40})])
    assert cut == free[:free.index(stop)]
    [short] = lm.generate_until([Request(prompt, {"until": "never there", "max_gen_toks": 5})])
    assert short == free[:5]


def test_an_unknown_task_is_one_line_naming_it(version, tmp_path):
    lineage, _ = version
    with pytest.raises(HarnessError) as e:
        run_harness(lineage, "v1", ["no_such_task"], include_path=str(tmp_path), include_defaults=False)
    assert_one_line(str(e.value), "harness task 'no_such_task' is not installed")


def test_without_lm_eval_the_module_imports_and_says_how_to_install_it(monkeypatch, version):
    # The module loaded afresh (under another name: lm_eval's registry keeps the real one) with lm_eval missing.
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval...` raises ModuleNotFoundError
    spec = importlib.util.spec_from_file_location("harness_without_lm_eval", harness.__file__)
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    for call in (lambda: bare.run_harness(version[0], "v1", ["tiny_mc"]), lambda: bare.LmadaptLM(version[0], "v1")):
        with pytest.raises(bare.HarnessError) as e:
            call()
        assert_one_line(str(e.value), 'lm-eval is not installed: pip install -e ".[eval]"')
