"""Scoring a version on a capability task (lmadapt.eval.tasks): multiple choice by log-likelihood, generation by
exact match and token F1. Definitions are lm-evaluation-harness's:

    acc        argmax_i  ll_i                      ll_i = sum log p(delimiter + choice_i | prompt)
    acc_norm   argmax_i  ll_i / len(choice_i)      (characters of the choice, as the harness's acc_norm)
    acc_bytes  argmax_i  ll_i / bytes(choice_i)    (UTF-8 bytes)
    exact_match, f1    max over the acceptable answers, after SQuAD normalisation (lowercase, no punctuation,
                       no articles a/an/the, single spaces); f1 on whitespace tokens

Generation is greedy KV-cached decoding (`lmadapt.generate`) for `max_new_tokens`, cut at the first stop string.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.data.tokenizers import Tokenizer
from lmadapt.eval.classification import classification_report
from lmadapt.eval.loglik import loglikelihoods
from lmadapt.eval.tasks import Task, fixed_labels
from lmadapt.generate import generate
from lmadapt.model import Transformer, per_layer

# Direction of every task metric: True where higher is better (the report's matrix needs it per column).
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "acc_bytes": True, "exact_match": True, "f1": True}


def choice_metrics(lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]
                   ) -> dict[str, Any]:
    """acc, acc_norm, acc_bytes over examples from their per-choice log-likelihoods; and the predictions."""
    preds = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for ll, ch in zip(lls, choices, strict=True):
        ll = np.asarray(ll, np.float64)
        preds["acc"].append(int(np.argmax(ll)))
        preds["acc_norm"].append(int(np.argmax(ll / np.array([float(len(c)) for c in ch]))))
        preds["acc_bytes"].append(int(np.argmax(ll / np.array([float(len(c.encode("utf-8"))) for c in ch]))))
    out: dict[str, Any] = {k: float(np.mean([p == a for p, a in zip(v, answers, strict=True)]))
                           for k, v in preds.items()}
    out["predictions"] = preds["acc"]
    return out


def score_multiple_choice(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, task: Task, *,
                          max_examples: int | None = None, pack: bool = True) -> dict[str, Any]:
    """acc / acc_norm / acc_bytes of a multiple-choice task (and macro P/R/F1 with the confusion matrix when
    the choices are one label set); every (prompt, choice) pair is one packed log-likelihood request."""
    examples = task.examples[:max_examples]
    requests = [(task.prompt(i), task.delimiter + c) for i, ex in enumerate(examples) for c in ex.choices]
    results = iter(loglikelihoods(params, model_cfg, tokenizer, requests, pack=pack))
    lls = [[next(results).logprob for _ in ex.choices] for ex in examples]
    metrics = choice_metrics(lls, [e.choices for e in examples], [e.answer for e in examples])
    out = {"task": task.name, "format": task.format, "key": f"{task.name}:{task.fingerprint}",
           "examples": len(examples), **metrics}
    labels = fixed_labels(task)
    if labels is not None:
        report = classification_report([labels[e.answer] for e in examples],
                                       [labels[p] for p in out["predictions"]], labels)
        out.update({k: report[k] for k in ("macro_precision", "macro_recall", "macro_f1", "confusion_matrix")})
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best SQuAD token F1 of `prediction` against any of `answers`."""
    def f1(pred: list[str], gold: list[str]) -> float:
        if not pred or not gold:
            return float(pred == gold)
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common == 0:
            return 0.0
        p, r = common / len(pred), common / len(gold)
        return 2 * p * r / (p + r)

    return max(f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)


def score_generate(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, task: Task, *,
                   max_new_tokens: int = 32, stop: Sequence[str] = ("\n",), max_examples: int | None = None
                   ) -> dict[str, Any]:
    """exact_match and f1 of greedy answers to a generation task; prompts of one length decode as one batch."""
    examples = task.examples[:max_examples]
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    prompts = [head + ids for ids in tokenizer.encode([task.prompt(i) for i in range(len(examples))])]
    model = Transformer(per_layer(model_cfg))
    by_length: dict[int, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    texts = [""] * len(examples)
    for length, members in by_length.items():
        room = max(0, min(max_new_tokens, model_cfg.max_seq_len - length))
        rows = jnp.asarray([prompts[i] for i in members], jnp.int32)
        out = np.asarray(jax.device_get(generate(model, params, rows, room, rng=jax.random.PRNGKey(0),
                                                 eos_id=tokenizer.eos_id)))
        for i, decoded in zip(members, tokenizer.decode([until_eos(r[length:], tokenizer.eos_id) for r in out]),
                              strict=True):
            texts[i] = cut_at_stop(decoded, stop)
    em = [exact_match(t, e.answers) for t, e in zip(texts, examples, strict=True)]
    f1 = [token_f1(t, e.answers) for t, e in zip(texts, examples, strict=True)]
    return {"task": task.name, "format": task.format, "key": f"{task.name}:{task.fingerprint}",
            "examples": len(examples), "exact_match": float(np.mean(em)), "f1": float(np.mean(f1)),
            "generations": texts}


def until_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    """The generated ids before the first EOS (generate fills the rest of a finished row with EOS)."""
    hits = np.flatnonzero(ids == eos_id)
    return ids[:hits[0]].tolist() if hits.size else ids.tolist()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` before the first stop string: what the harness keeps of `text.split(s)[0]` over every `s`."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text
