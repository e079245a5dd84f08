"""lm-evaluation-harness adapter: a model version as an `lm_eval` model, on lmadapt's own jitted forward pass
(packed log-likelihoods) and KV-cached decoding, without exporting it to transformers.

    python -m lmadapt.eval.harness --model lmadapt --model_args lineage=L,version=ID --tasks T [--include_path DIR]
    run_harness("L", "ID", ["T"], include_path="DIR")    # {"T": {"acc": ..., "acc_norm": ..., "examples": n}}

`python -m lmadapt.eval.harness` is the `lm_eval` command line with this model registered (`lm_eval` itself
discovers no third-party model; any program that imports this module can use `--model lmadapt` / `"lmadapt"`).

Requests follow the harness's HF model: `loglikelihood` splits a pair as `_encode_pair` does (lmadapt.eval.loglik:
BOS first when the tokenizer has one; an empty context is the prefix token alone), `loglikelihood_rolling` scores
`get_rolling_token_windows` + `make_disjoint_window` with the prefix token BOS (EOS without one) and the model's
maximum length, and `generate_until` left-truncates the context to leave `max_gen_toks`, decodes greedily unless
`do_sample`, and cuts the text at the first `until` string. Needs the `eval` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import collections
import difflib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmadapt.config import ModelConfig
from lmadapt.eval import loglik
from lmadapt.eval.task_scoring import cut_at_stop, until_eos
from lmadapt.generate import generate
from lmadapt.lineage.store import Lineage
from lmadapt.model import Transformer, per_layer

INSTALL = 'lm-eval is not installed: pip install -e ".[eval]"'
GEN_ROWS = 32  # prompts per generate call: bounds the KV cache of a task whose prompts share one length

try:
    import lm_eval.models  # noqa: F401  (keeps the built-in models: lm_eval fills only an empty registry itself)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise  # lm_eval is there but broken: its own error says why
    # lmadapt works without the extra: the class still defines, and using it says how to install lm-eval.
    LM, register_model, _AVAILABLE = object, lambda name: (lambda cls: cls), False
else:
    _AVAILABLE = True


class HarnessError(ValueError):
    """lm-eval is missing or a harness task is unknown; the message is one line."""


def _require() -> None:
    if not _AVAILABLE:
        raise HarnessError(INSTALL)


@register_model("lmadapt")
class LmadaptLM(LM):
    """A lineage version as an lm_eval model: `--model lmadapt --model_args lineage=DIR,version=ID`."""

    def __init__(self, lineage: str, version: str, max_gen_toks: int = 256, batch_size: Any = None,
                 max_batch_size: Any = None, device: Any = None) -> None:
        # batch_size / max_batch_size / device are the harness's own options, passed to every model: requests
        # are packed into rows of the model's maximum length, and JAX places the params itself.
        _require()
        super().__init__()
        store = Lineage(lineage)
        self.lineage, self.version = store.directory, version
        self.model_cfg: ModelConfig = per_layer(store.model_config(version))  # the layout versions load in
        self.tokenizer = store.tokenizer(version)
        self.params = jax.device_put(store.load_params(version, scan_layers=False))  # on device once, not per call
        self.params_hash = store.record(version)["params_hash"]
        self.max_gen_toks = int(max_gen_toks)

    @property
    def max_length(self) -> int:
        return self.model_cfg.max_seq_len

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) conditions on: BOS, or EOS without one."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the harness's results config: which params were scored."""
        return {"lineage": self.lineage, "version": self.version, "params_hash": self.params_hash}

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), every continuation token the argmax) per (context, continuation)."""
        pairs = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = loglik.encode_pair(self.tokenizer, context, continuation)
            pairs.append((ctx or [self.prefix_token_id], cont))  # no BOS: the harness conditions on EOS
        out = _scores(self.params, self.model_cfg, pairs)
        for request, result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum log p of each whole text, scored in the harness's disjoint windows of the model's maximum length."""
        pairs, owner = [], []
        texts = [r.args[0] for r in requests]
        for i, ids in enumerate(self.tokenizer.encode(texts) if texts else []):
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, _scores(self.params, self.model_cfg, pairs), strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, up to `max_gen_toks` tokens, EOS or the first `until` string."""
        head = [self.tokenizer.bos_id] if self.tokenizer.bos_id >= 0 else []
        contexts = [r.args[0] for r in requests]
        encoded = self.tokenizer.encode(contexts) if contexts else []
        # One generate call per (prompt length, settings): rows of a call share their shape and compiled loop.
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        prompts, stops = [], []
        for i, request in enumerate(requests):
            until, new, sampling = _gen_settings(request.args[1], self.max_gen_toks, self.max_length)
            prompts.append((head + encoded[i])[-(self.max_length - new):])  # keep the end, as the harness does
            stops.append(until)
            groups[(len(prompts[-1]), new, sampling)].append(i)
        texts = [""] * len(requests)
        model = Transformer(self.model_cfg)
        for (_, new, sampling), group in groups.items():
            for lo in range(0, len(group), GEN_ROWS):
                members = group[lo:lo + GEN_ROWS]
                for i, text in zip(members, self._generate(model, [prompts[i] for i in members], new, sampling),
                                   strict=True):
                    texts[i] = cut_at_stop(text, stops[i])
                    self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        return texts

    def _generate(self, model: Transformer, prompts: list[list[int]], new: int,
                  sampling: tuple[float, int | None, float | None]) -> list[str]:
        """The decoded continuations (up to EOS) of prompts of one length, as one batch."""
        temperature, top_k, top_p = sampling
        out = np.asarray(jax.device_get(generate(
            model, self.params, jnp.asarray(prompts, jnp.int32), new, rng=jax.random.PRNGKey(0),
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.tokenizer.eos_id)))
        return self.tokenizer.decode([until_eos(row[len(prompts[0]):], self.tokenizer.eos_id) for row in out])


def _scores(params: Any, model_cfg: ModelConfig, pairs: Sequence[tuple[list[int], list[int]]]
            ) -> list[tuple[float, bool]]:
    """(sum log p, all greedy) per (context ids, continuation ids): lmadapt's own packed scorer, so the same ids
    give the same numbers as `score_multiple_choice`."""
    return [(r.logprob, r.greedy) for r in loglik.score_token_pairs(params, model_cfg, pairs)]


def _gen_settings(kwargs: dict[str, Any] | None, default_new: int, max_length: int
                  ) -> tuple[list[str], int, tuple[float, int | None, float | None]]:
    """(stop strings, new tokens, (temperature, top_k, top_p)) of a request's generation kwargs; greedy unless
    `do_sample` (the harness's reading), and at least one prompt token left within the model's length."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    new = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(k) is not None),
               default_new)
    new = max(0, min(int(new), max_length - 1))
    if not kwargs.get("do_sample"):
        return until, new, (0.0, None, None)
    top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
    return until, new, (float(kwargs.get("temperature", 1.0)), None if top_k is None else int(top_k),
                        None if top_p is None else float(top_p))


def run_harness(lineage_dir: str, version: str, tasks: Sequence[str], include_path: str | None = None,
                limit: int | float | None = None, num_fewshot: int | None = None, *,
                include_defaults: bool = True) -> dict[str, dict[str, Any]]:
    """Harness metrics of a version per task (or group): {"arc_easy": {"acc": .., "acc_stderr": .., "examples": n}}.
    `include_path`: a folder of task YAMLs besides the harness's own (`include_defaults=False`: only those; the
    built-in index takes seconds to read). An unknown task name is a HarnessError naming it, before any loading."""
    _require()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    _check_tasks(tasks, list(manager.all_tasks))
    results = simple_evaluate(model=LmadaptLM(lineage_dir, version), tasks=list(tasks), task_manager=manager,
                              limit=limit, num_fewshot=num_fewshot, log_samples=False)
    counts = results.get("n-samples", {})
    out: dict[str, dict[str, Any]] = {}
    for task, values in results["results"].items():
        # "acc,none" -> "acc": the metric under lm_eval's default (no) filter keeps its plain name.
        out[task] = {key.removesuffix(",none"): v for key, v in values.items() if key != "alias"}
        if task in counts:
            out[task]["examples"] = counts[task]["effective"]
    return out


def _check_tasks(tasks: Sequence[str], known: list[str]) -> None:
    """HarnessError in one line for the first name that is neither a harness task/group/tag nor a YAML file."""
    if not tasks:
        raise HarnessError("no harness tasks given")
    names = set(known)
    for name in tasks:
        if name in names or (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
            continue
        if len(known) <= 20:
            hint = f"lm_eval tasks: {', '.join(sorted(known)) or 'none'}"
        else:
            close = difflib.get_close_matches(name, known, n=5)
            hint = f"{len(known)} lm_eval tasks" + (f"; closest: {', '.join(close)}" if close else "")
        raise HarnessError(f"harness task {name!r} is not installed ({hint}); --include_path adds a folder of "
                           f"task YAMLs")


def main(argv: list[str] | None = None) -> int:
    """The `lm_eval` command line with `--model lmadapt` available."""
    import sys

    try:
        _require()
    except HarnessError as e:
        print(e, file=sys.stderr)
        return 1
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
