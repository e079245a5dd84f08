"""Benchmark the training step: tokens/s, model FLOPs utilisation, peak memory, compile time.

    python tools/bench_train.py --config configs/tiny.yaml [--steps 10] [key.sub=value ...]
    python tools/bench_train.py --config configs/model/llama-1b.yaml --fit-batch --max-batch 64 --no-pipeline \
        --json out.json train.seq_len=2048 model.dtype=bfloat16 model.attention=cudnn model.remat=none

MFU is measured against a matmul peak this script measures on the same machine in the same run
(fp32, and bf16 where the compute dtype is bf16), so the ratio is meaningful on a noisy machine; on a GPU
whose datasheet peak is known (H100, H200) also against that. FLOPs per token: 6*N + 12*L*T*d (N =
parameters without position embeddings; the second term is attention's score and value matmuls, forward
and backward).

--fit-batch (GPU/TPU: a backend that reports its memory limit): compile the step at the config's batch,
read XLA's buffer plan, and grow the batch (doubling, up to --max-batch) while the plan predicts it fits in
92% of the device's memory; a batch that still runs out of memory is halved. The table says which batch ran.
Run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, or JAX keeps a quarter of the GPU to itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from benchinfo import cpu_line, gpu_line  # noqa: E402

from lmadapt.allocator import active_library, run_entry_point  # noqa: E402
from lmadapt.config import ConfigError, ModelConfig, load_config  # noqa: E402
from lmadapt.model import count_params  # noqa: E402
from lmadapt.precision import compute_dtype  # noqa: E402
from lmadapt.session import build  # noqa: E402

# Dense bf16 matmul peaks from the vendors' datasheets (SXM parts; the H200 has the H100's arithmetic).
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
FIT_FRACTION = 0.92  # of the device's memory a fitted batch's buffer plan may take (XLA needs some slack)


def matmul_peak(dtype: jnp.dtype, n: int | None = None, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul (accumulating in float32) on the default device (n: 8192 on a
    GPU, whose 2048-cube matmul is too short to reach its peak; 2048 elsewhere)."""
    n = n or (8192 if jax.default_backend() == "gpu" else 2048)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(m: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention (12 * layers * seq_len * d_attn)."""
    n = n_params - (m.max_seq_len * m.d_model if m.family == "gpt2" else 0)
    return 6 * n + 12 * m.n_layers * seq_len * m.n_heads * m.dim_per_head


def compiled_memory(compiled) -> dict[str, float] | None:
    """XLA's buffer plan for a compiled step: argument (state + batch), output and temporary bytes, and the
    peak it implies (outputs alias donated arguments). None where the backend gives no analysis."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional across backends and jax versions
        return None
    if ma is None:
        return None
    args, out, temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {"arguments": float(args), "outputs": float(out), "temp": float(temp),
            "total": float(args + out - alias + temp)}


def bench_pipeline(cfg, steps: int = 50) -> dict[str, float]:
    """Input pipeline throughput: a cold build (read, tokenize, pack, into an empty cache), a warm build
    (from the cache), and batch assembly tokens/s, all single-threaded on the host."""
    import tempfile

    from lmadapt.data.pipeline import build_pipeline

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        data = dataclasses.replace(cfg.data, cache_dir=cache)
        for kind in ("cold", "warm"):
            t = time.perf_counter()
            pipe = build_pipeline(data, cfg.tokenizer, cfg.train.batch_size, cfg.train.seq_len)
            out[f"{kind}_build_s"] = time.perf_counter() - t
        out["source_tokens"] = float(sum(len(c.rows.tokens) for c in pipe.components))
        t = time.perf_counter()
        for step in range(steps):
            pipe.batch(step)
        out["batch_tokens_per_s"] = steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t)
    return out


def peak_memory_bytes() -> tuple[str, float]:
    """Device peak where the backend reports it (GPU/TPU), else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", float(stats["peak_bytes_in_use"])
    return "host peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def time_steps(session: Any, steps: int, forward: bool = True) -> dict[str, Any]:
    """Compile the train step, then time `steps` train steps and (`forward`) `steps` forward-only (eval) steps."""
    with session.activate():
        state = session.init_fn(jax.random.PRNGKey(0))
        batch = session.batch(0)
        t = time.perf_counter()
        compiled = session.step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for step in range(1, steps + 1):
            batch = session.batch(step)
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        # Forward-only scoring (what eval.py runs) on the same batches.
        eval_compiled = session.eval_fn.lower(state.params, batch).compile() if forward else None
        if forward:
            jax.block_until_ready(eval_compiled(state.params, batch))
        eval_times = []
        for step in range(1, steps + 1 if forward else 1):
            batch = session.batch(step)
            t = time.perf_counter()
            jax.block_until_ready(eval_compiled(state.params, batch))
            eval_times.append(time.perf_counter() - t)
    return {"state": state, "metrics": metrics, "compiled": compiled, "compile_s": compile_s, "times": times,
            "eval_times": eval_times}


def profile(session: Any, run: dict[str, Any], directory: str, steps: int = 3) -> dict[str, Any]:
    """Trace `steps` more steps of the compiled step into `directory` and print where their time went."""
    from profile_ops import print_top, top_ops

    with session.activate():
        state = run["state"]
        with jax.profiler.trace(directory):
            for step in range(steps):
                state, metrics = run["compiled"](state, session.batch(1000 + step))
            jax.block_until_ready(metrics)
    run["state"] = state
    summary = top_ops(directory)
    print_top(summary)
    return summary


def datasheet_peak(device_kind: str) -> float | None:
    """The datasheet's dense bf16 peak for a GPU named `device_kind`, where it is in DATASHEET_BF16."""
    return next((peak for name, peak in DATASHEET_BF16.items() if name in device_kind), None)


def memory_limit() -> float | None:
    """The bytes the first device lets JAX allocate, where the backend says (GPU/TPU; not CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def with_batch(args: argparse.Namespace, batch: int) -> Any:
    return load_config(args.config, [*args.overrides, f"train.batch_size={batch}"])


def fit_batch(args: argparse.Namespace, cfg: Any) -> Any:
    """The config with the largest batch (the config's times a power of two, at most --max-batch) whose buffer
    plan, extrapolated linearly in the batch from the plan compiled at the config's batch, fits the device."""
    limit = memory_limit()
    if limit is None:
        print(f"fit-batch: {jax.default_backend()} reports no memory limit; batch {cfg.train.batch_size} as given")
        return cfg
    session = build(cfg)
    with session.activate():
        state = session.init_fn(jax.random.PRNGKey(0))
        plan = compiled_memory(session.step_fn.lower(state, session.batch(0)).compile())
        state_bytes = float(sum(x.nbytes for x in jax.tree.leaves(state)))
    del state, session
    if plan is None:
        print(f"fit-batch: no buffer plan on {jax.default_backend()}; batch {cfg.train.batch_size} as given")
        return cfg
    b0 = batch = cfg.train.batch_size
    per_row = max(plan["total"] - state_bytes, 1.0) / b0
    while batch * 2 <= args.max_batch and state_bytes + 2 * batch * per_row <= FIT_FRACTION * limit:
        batch *= 2
    while batch > 1 and batch % 2 == 0 and state_bytes + batch * per_row > FIT_FRACTION * limit:
        batch //= 2
    print(f"fit-batch: plan at batch {b0} is {plan['total'] / 2**30:.1f} GiB (state {state_bytes / 2**30:.1f} GiB, "
          f"{per_row / 2**30:.2f} GiB per row) of {limit / 2**30:.1f} GiB -> batch {batch}")
    return with_batch(args, batch) if batch != b0 else cfg


def run_fitting(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Build and time the step; a batch that runs out of device memory is halved (down to 1) and run again."""
    while True:
        session = build(cfg)
        try:
            return cfg, session, time_steps(session, args.steps, forward=not args.no_eval)
        except jax.errors.JaxRuntimeError as e:
            if not out_of_memory(e) or cfg.train.batch_size % 2:
                raise
            where = jax.devices()[0].device_kind
            print(f"batch {cfg.train.batch_size} x seq {cfg.train.seq_len} does not fit on {where} (out of memory): "
                  f"halving it")
        del session
        cfg = with_batch(args, cfg.train.batch_size // 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    parser.add_argument("--fit-batch", action="store_true", help="grow the batch to what fits the device's memory")
    parser.add_argument("--max-batch", type=int, default=64, help="the largest batch --fit-batch tries")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the input pipeline measurement")
    parser.add_argument("--no-eval", action="store_true", help="skip the forward-only (eval) measurement")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument("--profile", metavar="DIR", help="trace 3 more steps into DIR and print the top ops")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(cpu_line())
    print(gpu_line() or "gpu: none")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.fit_batch:
            cfg = fit_batch(args, cfg)
        cfg, session, run = run_fitting(args, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = report(cfg, session, run, pipeline=not args.no_pipeline)
    if args.profile:
        results["top_ops"] = profile(session, run, args.profile)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


def measure(cfg: Any, session: Any, run: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one timed run: speed, MFU against the measured and datasheet peaks, memory, compile time."""
    m, times = cfg.model, run["times"]
    n_params = count_params(run["state"].params)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    med = statistics.median(times)
    fpt = flops_per_token(m, n_params, cfg.train.seq_len)
    achieved = tokens / med * fpt
    dev = jax.devices()[0]
    peak = {"fp32": matmul_peak(jnp.float32)}
    if compute_dtype(m.dtype) == "bfloat16":
        peak["bf16"] = matmul_peak(jnp.bfloat16)
    sheet = datasheet_peak(dev.device_kind) if dev.platform == "gpu" else None
    mem_kind, mem = peak_memory_bytes()
    out = {"device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})", "jax": jax.__version__,
           "params": n_params, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "tokens_per_step": tokens,
           "dtype": m.dtype, "param_dtype": m.param_dtype, "attention": m.attention, "remat": m.remat,
           "scan_layers": m.scan_layers, "mesh": dict(session.mesh.shape), "compile_s": run["compile_s"],
           "step_s": {"median": med, "min": min(times), "max": max(times), "n": len(times)},
           "tokens_per_s": tokens / med, "flops_per_token": fpt, "model_flops_per_s": achieved,
           "matmul_peak": peak, "mfu": {k: achieved / v for k, v in peak.items()},
           "datasheet_peak_bf16": sheet, "mfu_datasheet": achieved / sheet if sheet else None,
           "memory_kind": mem_kind, "memory_bytes": mem, "plan": compiled_memory(run["compiled"]),
           "eval_tokens_per_s": tokens / statistics.median(run["eval_times"]) if run["eval_times"] else None,
           "final_loss": float(np.asarray(run["metrics"]["loss"]))}
    return out


def report(cfg: Any, session: Any, run: dict[str, Any], pipeline: bool = True) -> dict[str, Any]:
    """Print the measurements of `time_steps`, the memory plan and the input pipeline's speed; return them."""
    r, m = measure(cfg, session, run), cfg.model
    n_params, step = r["params"], r["step_s"]
    print(f"allocator:           {active_library() or 'glibc malloc'}")
    print(f"device: {r['device']}, jax {jax.__version__}")
    print(f"model: {m.family} L{m.n_layers} d{m.d_model} heads {m.n_heads}/{m.kv_heads} vocab {m.vocab_size}, "
          f"{n_params / 1e6:.1f}M params, param {m.param_dtype} compute {m.dtype}, scan={m.scan_layers} "
          f"remat={m.remat} attention={m.attention}")
    print(f"batch {r['batch']} x seq {r['seq_len']} = {r['tokens_per_step']} tokens/step, mesh {r['mesh']}")
    print(f"compile time:        {r['compile_s']:.2f} s")
    print(f"step time:           median {step['median'] * 1e3:.1f} ms, min {step['min'] * 1e3:.1f}, "
          f"max {step['max'] * 1e3:.1f} ({step['n']} steps)")
    print(f"tokens/s:            {r['tokens_per_s']:,.0f}")
    print(f"model FLOP/s:        {r['model_flops_per_s'] / 1e9:,.1f} GFLOP/s ({r['flops_per_token']:.3g} FLOPs/token)")
    for kind, peak in r["matmul_peak"].items():
        print(f"matmul peak {kind}:    {peak / 1e9:,.1f} GFLOP/s  -> MFU {r['mfu'][kind]:.1%}")
    if r["datasheet_peak_bf16"]:
        print(f"datasheet bf16 peak: {r['datasheet_peak_bf16'] / 1e12:,.0f} TFLOP/s -> MFU {r['mfu_datasheet']:.1%}")
    print(f"{r['memory_kind'] + ':':<20} {r['memory_bytes'] / 2**30:.2f} GiB ({r['memory_bytes'] / n_params:.1f} "
          f"bytes/param)")
    plan = r["plan"]
    if plan:
        print(f"compiled step memory: {plan['total'] / 2**30:.2f} GiB = {plan['total'] / n_params:.1f} bytes/param "
              f"(state {plan['arguments'] / 2**30:.2f} GiB, temporaries {plan['temp'] / 2**30:.2f} GiB: "
              f"gradients + activations)")
    if r["eval_tokens_per_s"]:
        print(f"eval tokens/s:       {r['eval_tokens_per_s']:,.0f} (forward only) = "
              f"{r['eval_tokens_per_s'] / r['tokens_per_s']:.2f}x training")
    print(f"final loss:          {r['final_loss']:.4f}")
    if pipeline:
        r["pipeline"] = report_pipeline(cfg, r["tokens_per_s"])
    return r


def report_pipeline(cfg: Any, tok_s: float) -> dict[str, float]:
    """Measure and print the input pipeline's speed against what the train step consumes."""
    pipe = bench_pipeline(cfg)
    cold_tok_s = pipe["source_tokens"] / pipe["cold_build_s"]
    print(f"input pipeline:      cold {pipe['cold_build_s']:.2f} s ({cold_tok_s:,.0f} tokens/s read+tokenize+pack)"
          f", warm {pipe['warm_build_s']:.2f} s "
          f"({pipe['source_tokens'] / pipe['warm_build_s']:,.0f} tokens/s)")
    print(f"batch assembly:      {pipe['batch_tokens_per_s']:,.0f} tokens/s = "
          f"{pipe['batch_tokens_per_s'] / tok_s:,.0f}x what the train step consumes")
    return pipe


if __name__ == "__main__":
    run_entry_point(main)  # under the caching malloc train.py uses; LMADAPT_MALLOC=system measures glibc
