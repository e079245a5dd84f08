"""Benchmark multiple-choice scoring: packed rows against one request per row, on a bundled task.

    python tools/bench_eval.py                                  # shakespeare_next_line, the quickstart model size
    python tools/bench_eval.py --task debian_section --model tiny --tokenizer bytes --repeats 7 --dtype bfloat16

Prints the CPU (lscpu's model name and whether it has the bf16 instructions avx512_bf16 / amx_bf16) and the
JAX backend first. Then scores every (prompt, choice) request of the task (as configs/eval/tasks.yaml sets it
up: few-shot prompts included) with `lmadapt.eval.loglik.loglikelihoods` on a randomly initialised model in
the per-layer layout versions load in, with a byte-level BPE of the model's vocabulary size trained here on
1 MB each of the quickstart's corpora (as the quickstart's tokenizer is; `--tokenizer bytes`: bytes), both ways: packed
(`pack=True`, first-fit rows of max_seq_len tokens) and one by one (`pack=False`). One untimed pass of each
compiles every shape; then `--repeats` timed passes of each, interleaved (the order alternating) so drift in
the machine's speed hits both alike. Reports median seconds, examples/s and requests/s of each, the ratio, and
the largest difference between the two ways' per-request log-likelihoods (they must agree to 1e-5).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmadapt.config import load_config  # noqa: E402
from lmadapt.data.sources import decode, read_bytes  # noqa: E402
from lmadapt.data.tokenizers import ByteTokenizer, Tokenizer, train_bpe  # noqa: E402
from lmadapt.eval.loglik import ROWS, _rows, encode_pair, loglikelihoods  # noqa: E402
from lmadapt.eval.task_report import load_tasks, read_suite  # noqa: E402
from lmadapt.model import count_params, init_params, per_layer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchinfo import cpu_line  # noqa: E402

MODELS = {"quickstart": os.path.join(ROOT, "configs", "quickstart.yaml"),
          "tiny": os.path.join(ROOT, "configs", "tiny.yaml")}
SUITE = os.path.join(ROOT, "configs", "eval", "tasks.yaml")
CORPORA = ("shakespeare", "python_docs")
TOLERANCE = 1e-5


def tokenizer(kind: str, vocab_size: int) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    texts = []
    for name in CORPORA:
        path = os.path.join(ROOT, "data", f"{name}.txt.xz")
        text = decode(read_bytes(path), path, "fail")[0][:2**20]
        texts += [text[i:i + 4096] for i in range(0, len(text), 4096)]
    return train_bpe(texts, vocab_size)


def padded_slots(rows: list[list[int]], width: int) -> int:
    """Token positions the forward passes compute: as loglikelihoods lays them out, ROWS rows a pass, each pass
    as wide as the power of two that holds its fullest row (at most `width`)."""
    total = 0
    for lo in range(0, len(rows), ROWS):
        used = max(sum(r) for r in rows[lo:lo + ROWS])
        total += ROWS * min(width, 1 << max(used - 1, 0).bit_length())
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="shakespeare_next_line", help="a multiple-choice task of the suite")
    p.add_argument("--suite", default=SUITE, help="task suite YAML (default configs/eval/tasks.yaml)")
    p.add_argument("--model", choices=sorted(MODELS), default="quickstart", help="model size (random init)")
    p.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe",
                   help="byte-level BPE trained here (the model's vocab size), or bytes (default bpe)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of each way (default 5)")
    p.add_argument("--width", type=int, default=None,
                   help="tokens per row, both ways (default: the model's max_seq_len, as task scoring uses)")
    p.add_argument("--max-examples", type=int, default=None, help="only the first N examples")
    args = p.parse_args(argv)
    suite = os.path.abspath(args.suite)
    os.chdir(ROOT)  # a suite's task paths are relative to the repository root

    print(cpu_line())
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine skews both ways)")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices: "
          f"{', '.join(str(d) for d in jax.devices())}")

    found = [(c, t) for c, t in load_tasks(read_suite(suite), suite) if c.name == args.task]
    if not found or found[0][1].format != "multiple_choice":
        print(f"error: {suite} has no multiple-choice task {args.task!r}", file=sys.stderr)
        return 2
    cfg_task, task = found[0]
    examples = task.examples[:args.max_examples]
    requests = [(task.prompt(i), task.delimiter + c) for i, ex in enumerate(examples) for c in ex.choices]

    model_cfg = dataclasses.replace(per_layer(load_config(MODELS[args.model]).model), dtype=args.dtype)
    params = nn.unbox(init_params(model_cfg, jax.random.PRNGKey(0)))
    tok = tokenizer(args.tokenizer, model_cfg.vocab_size)
    width = args.width or model_cfg.max_seq_len
    lengths = [min(sum(map(len, encode_pair(tok, c, x))), width + 1) - 1 for c, x in requests]
    packed_rows = _rows(lengths, width)
    print(f"model: {args.model} size ({model_cfg.family}, d_model {model_cfg.d_model}, {model_cfg.n_layers} "
          f"layers, vocab {model_cfg.vocab_size}, max_seq_len {model_cfg.max_seq_len}, "
          f"{count_params(params) / 1e6:.2f}M params), "
          f"random init, per-layer layout, compute {args.dtype}, tokenizer "
          f"{'bytes' if args.tokenizer == 'bytes' else f'byte-level BPE ({tok.vocab_size})'}")
    print(f"task: {task.name} ({cfg_task.path}, {cfg_task.num_fewshot}-shot): {len(examples)} examples, "
          f"{len(requests)} requests, {sum(lengths)} tokens to score")
    for name, layout in (("packed", [[lengths[i] for i in row] for row in packed_rows]),
                         ("one by one", [[n] for n in lengths])):
        slots = padded_slots(layout, width)
        print(f"  {name}: {len(layout)} rows in {-(-len(layout) // ROWS)} forward passes of {ROWS} rows, "
              f"{slots} token slots computed ({sum(lengths) / slots:.0%} of them real)")

    def run(pack: bool) -> tuple[float, list]:
        t = time.perf_counter()
        out = loglikelihoods(params, model_cfg, tok, requests, width=width, pack=pack)
        return time.perf_counter() - t, out

    t0 = time.perf_counter()
    _, packed = run(True)
    _, alone = run(False)
    print(f"compile + first pass of both: {time.perf_counter() - t0:.1f}s")
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        for pack in ((True, False) if r % 2 == 0 else (False, True)):
            times[pack].append(run(pack)[0])

    a = np.array([x.logprob for x in packed], np.float64)
    b = np.array([x.logprob for x in alone], np.float64)
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(b), 1e-30)
    same_greedy = all(x.greedy == y.greedy and x.tokens == y.tokens for x, y in zip(packed, alone, strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'':12}{'median s':>10}{'examples/s':>12}{'requests/s':>12}   all {args.repeats} passes (s)")
    for pack, name in ((True, "packed"), (False, "one by one")):
        print(f"{name:12}{med[pack]:10.3f}{len(examples) / med[pack]:12.1f}{len(requests) / med[pack]:12.1f}   "
              + " ".join(f"{t:.3f}" for t in times[pack]))
    print(f"ratio packed / one by one (examples/s): {med[False] / med[True]:.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = bool(np.all(diff <= TOLERANCE + TOLERANCE * np.abs(b)))
    print(f"log-likelihoods, packed vs one by one: max abs difference {diff.max():.3g} (max relative "
          f"{rel.max():.3g}, over {len(requests)} requests); within {TOLERANCE:g}: {'yes' if ok else 'NO'}; "
          f"greedy flags and token counts equal: {'yes' if same_greedy else 'NO'}")
    return 0 if ok and same_greedy else 1


if __name__ == "__main__":
    sys.exit(main())
