"""Benchmark the training step: tokens/s, model FLOPs utilisation, peak memory, compile time.

    python tools/bench_train.py --config configs/tiny.yaml [--steps 10] [key.sub=value ...]

MFU is measured against a matmul peak this script measures on the same machine in the same run
(fp32, and bf16 where the compute dtype is bf16), so the ratio is meaningful on a noisy machine.
FLOPs per token: 6*N + 12*L*T*d (N = parameters without position embeddings; the second term is
attention's score and value matmuls, forward and backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmadapt.allocator import active_library, run_entry_point  # noqa: E402
from lmadapt.config import ConfigError, ModelConfig, load_config  # noqa: E402
from lmadapt.model import count_params  # noqa: E402
from lmadapt.session import build  # noqa: E402


def matmul_peak(dtype: jnp.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul (accumulating in float32) on the default device."""
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


def time_steps(session: Any, steps: int) -> dict[str, Any]:
    """Compile the train step, then time `steps` train steps and `steps` forward-only (eval) steps."""
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
        eval_compiled = session.eval_fn.lower(state.params, batch).compile()
        jax.block_until_ready(eval_compiled(state.params, batch))
        eval_times = []
        for step in range(1, steps + 1):
            batch = session.batch(step)
            t = time.perf_counter()
            jax.block_until_ready(eval_compiled(state.params, batch))
            eval_times.append(time.perf_counter() - t)
    return {"state": state, "metrics": metrics, "compiled": compiled, "compile_s": compile_s, "times": times,
            "eval_times": eval_times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        session = build(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = time_steps(session, args.steps)
    report(cfg, session, run)
    return 0


def report(cfg: Any, session: Any, run: dict[str, Any]) -> None:
    """Print the measurements of `time_steps`, the memory plan and the input pipeline's speed."""
    m, state, times = cfg.model, run["state"], run["times"]
    n_params = count_params(state.params)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    med = statistics.median(times)
    tok_s = tokens / med
    achieved = tok_s * flops_per_token(m, n_params, cfg.train.seq_len)
    peak32 = matmul_peak(jnp.float32)
    peak16 = matmul_peak(jnp.bfloat16) if m.dtype == "bfloat16" else None
    mem_kind, mem = peak_memory_bytes()

    dev = jax.devices()[0]
    print(f"allocator:           {active_library() or 'glibc malloc'}")
    print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    print(f"model: {m.family} L{m.n_layers} d{m.d_model} heads {m.n_heads}/{m.kv_heads} vocab {m.vocab_size}, "
          f"{n_params / 1e6:.1f}M params, param {m.param_dtype} compute {m.dtype}, scan={m.scan_layers} "
          f"remat={m.remat} attention={m.attention}")
    print(f"batch {cfg.train.batch_size} x seq {cfg.train.seq_len} = {tokens} tokens/step, "
          f"mesh {dict(session.mesh.shape)}")
    print(f"compile time:        {run['compile_s']:.2f} s")
    print(f"step time:           median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} "
          f"({len(times)} steps)")
    print(f"tokens/s:            {tok_s:,.0f}")
    print(f"model FLOP/s:        {achieved / 1e9:,.1f} GFLOP/s ({flops_per_token(m, n_params, cfg.train.seq_len):.3g} "
          f"FLOPs/token)")
    print(f"matmul peak fp32:    {peak32 / 1e9:,.1f} GFLOP/s  -> MFU {achieved / peak32:.1%}")
    if peak16:
        print(f"matmul peak bf16:    {peak16 / 1e9:,.1f} GFLOP/s  -> MFU {achieved / peak16:.1%}")
    print(f"{mem_kind + ':':<20} {mem / 2**30:.2f} GiB ({mem / n_params:.1f} bytes/param)")
    plan = compiled_memory(run['compiled'])
    if plan:
        print(f"compiled step memory: {plan['total'] / 2**30:.2f} GiB = {plan['total'] / n_params:.1f} bytes/param "
              f"(state {plan['arguments'] / 2**30:.2f} GiB, temporaries {plan['temp'] / 2**30:.2f} GiB: "
              f"gradients + activations)")
    eval_tok_s = tokens / statistics.median(run['eval_times'])
    print(f"eval tokens/s:       {eval_tok_s:,.0f} (forward only) = {eval_tok_s / tok_s:.2f}x training")
    print(f"final loss:          {float(np.asarray(run['metrics']['loss'])):.4f}")
    pipe = bench_pipeline(cfg)
    cold_tok_s = pipe["source_tokens"] / pipe["cold_build_s"]
    print(f"input pipeline:      cold {pipe['cold_build_s']:.2f} s ({cold_tok_s:,.0f} tokens/s read+tokenize+pack)"
          f", warm {pipe['warm_build_s']:.2f} s "
          f"({pipe['source_tokens'] / pipe['warm_build_s']:,.0f} tokens/s)")
    print(f"batch assembly:      {pipe['batch_tokens_per_s']:,.0f} tokens/s = "
          f"{pipe['batch_tokens_per_s'] / tok_s:,.0f}x what the train step consumes")


if __name__ == "__main__":
    run_entry_point(main)  # under the caching malloc train.py uses; LMADAPT_MALLOC=system measures glibc
