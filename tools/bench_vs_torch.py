"""lmadapt's training step against Hugging Face transformers on torch, same model and weights.

    python tools/bench_vs_torch.py [--family gpt2] [--layers 6 --d-model 384 --heads 6 --seq 256 --batch 8]
        [--steps 8] [--rounds 2] [--variants jax-fp32,jax-bf16,torch-fp32,torch-bf16,torch-compile-bf16]
        [--malloc both|system|fast] [--jax-python PATH]

The model is initialised once in lmadapt and exported through the HF export path, so every variant
starts from identical weights and trains on identical random tokens with AdamW (lr 1e-4, no decay,
no clipping). Each variant runs in its own process, `--rounds` times, alternating A B C A B C to
spread the machine's noise over all of them; the table gives the median step time over all rounds
with its spread, tokens/s, model FLOPs utilisation against the fp32 matmul peak measured in the same
run (FLOPs/token = 6N + 12·L·T·d, N without position embeddings), the first-step (compile) time,
peak RSS, and each variant's ratio to the best torch variant.

`jax-auto` is lmadapt's default, `model.dtype: auto` (lmadapt/precision.py). `--jax-python PATH` runs the jax
variants under another interpreter, e.g. a Python 3.12 environment with jax >= 0.11 (the one whose CPU backend
reaches the BF16 units), while torch's run in this one (the CPU torch wheel is for Python 3.11); each row
names the jax version it ran. The CPU model and its bf16 flags are printed first.

`--malloc` runs each variant with glibc malloc ("system"), with the caching allocator train.py
preloads ("fast": tcmalloc or jemalloc, see lmadapt/allocator.py), or both (the default): torch
gains from it too, so the fair comparison is like against like, and the table shows every pairing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_config(args):
    from lmadapt.config import ModelConfig

    return ModelConfig(family=args.family, vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, d_ff=4 * args.d_model, max_seq_len=max(args.seq, 64),
                       tie_embeddings=args.family == "gpt2", scan_layers=False)


def prepare(args, directory: str) -> None:
    """Export one random model and one token batch for every variant."""
    import flax.linen as nn
    import jax
    import numpy as np

    from lmadapt.hf import export_hf
    from lmadapt.model import init_params

    cfg = model_config(args)
    params = jax.tree.map(np.asarray, nn.unbox(init_params(cfg, jax.random.PRNGKey(0))))
    export_hf(os.path.join(directory, "model"), params, cfg)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int64)
    np.save(os.path.join(directory, "tokens.npy"), tokens)


def run_jax(args, directory: str, precision: str) -> list[float]:
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lmadapt.hf import import_hf
    from lmadapt.model import Transformer
    from lmadapt.train_step import TrainState, train_step

    params, cfg, _ = import_hf(os.path.join(directory, "model"))
    dtype = {"bf16": "bfloat16", "fp32": "float32", "auto": "auto"}[precision]
    cfg = dataclasses.replace(cfg, dtype=dtype, scan_layers=False)
    model = Transformer(cfg)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    tokens = np.load(os.path.join(directory, "tokens.npy"), allow_pickle=False).astype(np.int32)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.float32)}
    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=lambda s: 1e-4), donate_argnums=0)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return times


def run_torch(args, directory: str, precision: str, compiled: bool) -> list[float]:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(directory, "model"),
                                                              attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    tokens = torch.from_numpy(np.load(os.path.join(directory, "tokens.npy"), allow_pickle=False))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    step_loss = torch.compile(loss_fn) if compiled else loss_fn
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_loss()
        loss.backward()
        opt.step()
        float(loss)
        times.append(time.perf_counter() - t0)
    return times


def child(args) -> int:
    """One variant in this process; prints its step times and peak RSS as JSON."""
    import resource

    name = args.child
    if name == "peak":  # the matmul peaks of the jax the jax variants run on
        import jax.numpy as jnp

        from tools.bench_train import matmul_peak

        print(json.dumps({"fp32": matmul_peak(jnp.float32), "bf16": matmul_peak(jnp.bfloat16)}))
        return 0
    if name.startswith("jax"):
        import jax

        from lmadapt.precision import compute_dtype

        times = run_jax(args, args.dir, name.split("-")[-1])
        ran = f"jax {jax.__version__}" + (f", auto = {compute_dtype('auto')}" if name.endswith("auto") else "")
    else:
        import torch

        times = run_torch(args, args.dir, name.split("-")[-1], "compile" in name)
        ran = f"torch {torch.__version__}"
    print(json.dumps({"times": times, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "ran": ran}))
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after one compile/warm-up step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="jax-auto,jax-fp32,jax-bf16,torch-fp32,torch-bf16,torch-compile-bf16")
    p.add_argument("--jax-python", default=sys.executable, help="the interpreter of the jax variants")
    p.add_argument("--malloc", default="both", help="both, system, fast, or a list of system,tcmalloc,jemalloc")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args()


MALLOCS = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}


def malloc_envs(choice: str) -> tuple[list[str], dict[str, dict[str, str] | None]]:
    """(the mallocs to run under, their environments): `choice` is both (glibc's and the one train.py preloads),
    system, fast, or a comma-separated list of system, fast, tcmalloc, jemalloc."""
    from lmadapt.allocator import CANDIDATES, find_library, preload_env

    names = {"both": ["system", "fast"]}.get(choice, choice.split(","))
    system_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    system_env["LMADAPT_MALLOC"] = "system"
    envs: dict[str, dict[str, str] | None] = {"system": system_env}
    for name in names:
        if name == "system":
            continue
        library = find_library("") if name == "fast" else \
            next((c for c in CANDIDATES if c.endswith(MALLOCS.get(name, "?")) and os.path.isfile(c)), None)
        if library is None:
            print(f"no {name} installed (apt install libtcmalloc-minimal4 libjemalloc2): skipped", file=sys.stderr)
            continue
        envs[name] = preload_env(library, system_env)
    return [n for n in names if n in envs], envs


def run_variants(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every variant under every malloc, `rounds` times interleaved, each in its own process."""
    mallocs, envs = malloc_envs(args.malloc)
    with tempfile.TemporaryDirectory() as directory:
        prepare(args, directory)
        variants = [(v, m) for v in args.variants.split(",") for m in mallocs]
        runs: dict[str, list[dict]] = {f"{v} {m}": [] for v, m in variants}
        script = [os.path.abspath(__file__), "--dir", directory]
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("family", "layers", "d_model", "heads", "vocab", "seq", "batch", "steps")]
        for _ in range(args.rounds):
            for v, m in variants:
                python = args.jax_python if v.startswith("jax") else sys.executable
                out = subprocess.run([python, *script, *flags, "--child", v], capture_output=True, text=True,
                                     cwd=ROOT, env=dict(envs[m], PYTHONPATH=ROOT))
                name = f"{v} {m}"
                if out.returncode != 0:
                    print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                steady = runs[name][-1]["times"][1:]
                # Progress as it goes: a long run cut short still leaves its measurements.
                print(f"  {name}: median step {statistics.median(steady) * 1e3:.1f} ms "
                      f"({args.batch * args.seq / statistics.median(steady):,.0f} tokens/s)", flush=True)
    return runs


def print_table(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    """Tokens/s, step times, MFU, first step and RSS per variant, and ratios to the best torch variant."""
    import jax
    import jax.numpy as jnp

    from lmadapt.model import count_params, init_params
    from tools.bench_train import flops_per_token, matmul_peak  # the same formulas as bench_train

    cfg = model_config(args)
    n_params = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    fpt = flops_per_token(cfg, n_params, args.seq)
    out = subprocess.run([args.jax_python, os.path.abspath(__file__), "--child", "peak"], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    peaks = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
        {"fp32": matmul_peak(jnp.float32), "bf16": float("nan")}
    peak = peaks["fp32"]
    tokens = args.batch * args.seq
    rows = {}
    for v, rs in runs.items():
        if not rs:
            continue
        steady = [t for r in rs for t in r["times"][1:]]
        med = statistics.median(steady)
        rows[v] = {"median_ms": med * 1e3, "min_ms": min(steady) * 1e3, "max_ms": max(steady) * 1e3,
                   "tok_s": tokens / med,
                   "mfu": tokens / med * fpt / (peaks["bf16"] if _bf16_variant(v, rs) else peak),
                   "first_step_s": statistics.median(r["times"][0] for r in rs),
                   "rss_gib": max(r["rss"] for r in rs) / 2**30, "ran": rs[-1].get("ran", "")}

    def best_torch(malloc: str | None) -> float:
        return max((r["tok_s"] for v, r in rows.items()
                    if v.startswith("torch") and (malloc is None or v.endswith(" " + malloc))), default=float("nan"))

    from tools.benchinfo import cpu_line

    print(cpu_line())
    print(f"model: {cfg.family} L{cfg.n_layers} d{cfg.d_model} vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; "
          f"batch {args.batch} x seq {args.seq}; {args.rounds} rounds x {args.steps} steps; fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (2048^3, the jax variants' jax); "
          f"FLOPs/token {fpt:.3g}")
    print("MFU: against the fp32 peak for fp32 variants, the bf16 peak for bf16 ones (jax-auto: what it picked)")
    print(f"{'variant':<26} {'tokens/s':>9} {'median ms':>10} {'spread ms':>15} {'MFU':>6} {'1st step s':>10} "
          f"{'RSS GiB':>8} {'/best torch same malloc':>23} {'/best torch':>11}")
    for v, r in rows.items():
        same = best_torch(v.rsplit(" ", 1)[1])
        print(f"{v:<26} {r['tok_s']:>9,.0f} {r['median_ms']:>10.1f} {r['min_ms']:>7.1f}-{r['max_ms']:<7.1f} "
              f"{r['mfu']:>6.1%} {r['first_step_s']:>10.2f} {r['rss_gib']:>8.2f} {r['tok_s'] / same:>22.2f}x "
              f"{r['tok_s'] / best_torch(None):>10.2f}x  {r['ran']}")


def _bf16_variant(name: str, runs: list[dict]) -> bool:
    return "bf16" in name.split()[0] or "bfloat16" in runs[-1].get("ran", "")


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    print_table(args, run_variants(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
