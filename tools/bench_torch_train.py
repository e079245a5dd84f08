"""Benchmark Hugging Face transformers' training step (torch) on the model an lmadapt config describes.

    python tools/bench_torch_train.py --config configs/model/llama-1b.yaml [--steps 10] [--batch B]
        [--variants eager,compile] [--compile-timeout 180] [--json FILE] [key.sub=value ...]

The torch half of a comparison with tools/bench_train.py, like for like: the shape lmadapt's exporter writes
(`config_to_hf`, built offline, random init, fp32 parameters, "sdpa" attention), batch and seq_len, bf16 autocast
where model.dtype is bfloat16, the model's own causal-LM loss on random tokens, AdamW (lr 1e-4, fused on CUDA),
and gradient checkpointing where model.remat is not "none". Each variant (eager, torch.compile(model)) runs in its
own process: compile gets --compile-timeout s for its first steps, an OOM retries once at half the batch. Reported:
first step (compilation included), median step over --steps after 2 warm-ups, tokens/s, MFU (FLOPs/token from
bench_train: 6N + 12*L*T*d_attn) against a bf16 matmul peak measured in the run and a known GPU's datasheet, peak
memory (CPU: RSS), final loss. Exit 0 if a variant ran, 1 if none did, 2 on bad input, 3 without torch/transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # lmadapt imports jax: keep it off the GPU that torch measures

VARIANTS = ("eager", "compile")
WARMUP = 2
# bf16 dense tensor-core peaks (NVIDIA datasheets), by the first substring of torch.cuda.get_device_name that
# matches; None: a part whose peak differs from its family's (MIG slices, NVL boards), so no datasheet MFU.
DATASHEET = (("MIG", None), ("NVL", None), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12))



def _bf16(dtype: str) -> bool:
    """Whether the jax side computes in bf16: model.dtype=auto resolved without starting a jax backend here
    (on a GPU that would take its memory from torch)."""
    if dtype != "auto":
        return dtype == "bfloat16"
    from benchinfo import gpu_line

    from lmadapt import precision

    platform = "gpu" if gpu_line() else "cpu"
    return precision.choose(platform, precision.cpu_flags(), precision.jax_version())[0] == "bfloat16"

def _write(path: str, data: dict[str, Any]) -> None:
    """Replace `path` atomically: the parent polls it and must never read half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _read(path: str) -> dict[str, Any]:
    """The JSON in `path`, or {} before the child has written it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def matmul_peak(device: Any, sync: Any, reps: int = 10, budget_s: float = 3.0) -> float:
    """Best-of-`reps` FLOP/s of an n^3 bf16 matmul after one warm-up (n = 8192 on CUDA, 1024 on CPU), stopping
    early once `budget_s` is spent (a CPU without bf16 units takes seconds per product; an H100 a millisecond)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best, start = float("inf"), time.perf_counter()
    for i in range(reps + 1):  # i == 0: the warm-up (cuBLAS handle, kernel selection)
        sync()
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t) if i else best
        if i and time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best


def build_model(hf: dict[str, Any], device: Any, remat: bool) -> Any:
    """The transformers causal LM of a config.json dict, random init in float32 on `device`, in train mode."""
    import torch
    import transformers

    rest = dict(hf)
    config = transformers.AutoConfig.for_model(rest.pop("model_type"), **rest)
    with device:  # initialise on the device: a 1B model's random init on the host would outlast the bench
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    if remat:  # non-reentrant: what torch.compile can trace, and torch's recommended form
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train(job: dict[str, Any], variant: str, batch: int, progress: Any) -> dict[str, Any]:
    """Measure one variant: first step, WARMUP steps, then job["steps"] timed steps; `progress(**kw)` reports."""
    import resource

    import numpy as np
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # CUDA runs asynchronously: a host timer measures the device only after a synchronize.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as XLA's default precision on GPU
    peak = matmul_peak(device, sync)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)  # every variant starts from the same random weights
    model = build_model(job["hf"], device, job["remat"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = np.random.default_rng(0).integers(0, job["hf"]["vocab_size"], (batch, job["seq_len"]))
    ids = torch.from_numpy(tokens).to(device)
    forward = torch.compile(model) if variant == "compile" else model

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["bf16"]):
            loss = forward(input_ids=ids, labels=ids).loss  # the model's own shifted causal-LM loss
        loss.backward()
        opt.step()
        return loss

    progress(phase="first_step", matmul_peak=peak, attn=model.config._attn_implementation)
    t = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t
    for _ in range(WARMUP):
        step()
    sync()
    progress(phase="timing", first_step_s=first)
    times = []
    for _ in range(job["steps"]):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    # Peak bytes: torch's allocator peak on CUDA (weights, gradients, AdamW state, activations), else peak RSS.
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0)
    return {"phase": "done", "times": times, "final_loss": float(loss), "peak_mem": float(mem)}


def child(args: argparse.Namespace) -> int:
    """Run variant `args.child` and write its result (partial ones as it goes) to `args.out`."""
    import torch

    with open(args.job, encoding="utf-8") as f:
        job = json.load(f)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"batch": args.batch, "status": "running", "device": device}

    def progress(**kw: Any) -> None:  # accumulates, so a killed child leaves all it had measured
        result.update(kw)
        _write(args.out, result)

    progress()
    try:
        result.update(train(job, args.child, args.batch, progress))
        result["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure becomes this variant's row, not a traceback
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        result["status"] = "oom" if oom else f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    _write(args.out, result)
    return 0


def run_child(args: argparse.Namespace, variant: str, batch: int, job_path: str) -> dict[str, Any]:
    """One variant in a fresh process (its own session, so a kill takes inductor's compile workers too)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--job", job_path, "--out", out,
               "--batch", str(batch)]
        with open(log, "w", encoding="utf-8") as err:
            proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
            started = None  # when this process saw the first step begin: the compile clock starts there
            while proc.poll() is None:
                time.sleep(0.2)
                if variant != "compile" or _read(out).get("phase") != "first_step":
                    continue
                started = started or time.monotonic()
                if time.monotonic() - started > args.compile_timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return {**_read(out), "batch": batch, "status": "timeout",
                            "note": f"compile did not finish in {args.compile_timeout:g} s"}
        result = _read(out)
        if result.get("status") in (None, "running"):  # died without a word: a signal, the host OOM killer, ...
            with open(log, encoding="utf-8", errors="replace") as f:
                tail = ([line.strip() for line in f if line.strip()] or [""])[-1]
            result.update(batch=batch, status=f"error: exit code {proc.returncode}: {tail[:200]}")
        return result


def run_variant(args: argparse.Namespace, variant: str, batch: int, job_path: str, notes: list[str]) -> dict:
    """A variant, retried once at half the batch if it runs out of memory."""
    result = run_child(args, variant, batch, job_path)
    if result["status"] == "oom":
        notes.append(f"{variant}: batch {batch} x seq {args.seq_len} does not fit on {result.get('device', '?')} "
                     f"(out of memory)" + (f"; retrying at batch {batch // 2}" if batch > 1 else ""))
        if batch > 1:
            result = {**run_child(args, variant, batch // 2, job_path), "oom_at_batch": batch}
    return result


def summarize(r: dict[str, Any], seq_len: int, fpt: float, peaks: tuple[float | None, float | None]) -> None:
    """Add median/min/max step ms, tokens/s and both MFUs to a finished variant's result, in place."""
    if r.get("status") != "ok":
        return
    med = statistics.median(r["times"])
    r.update(median_ms=med * 1e3, min_ms=min(r["times"]) * 1e3, max_ms=max(r["times"]) * 1e3,
             tokens_per_s=r["batch"] * seq_len / med)
    for key, peak in zip(("mfu_measured", "mfu_datasheet"), peaks, strict=True):
        r[key] = r["tokens_per_s"] * fpt / peak if peak else None


def table(results: dict[str, dict[str, Any]], seq_len: int) -> list[str]:
    """The markdown table, one row per variant ('-' where a variant has no such number)."""
    def num(r: dict[str, Any], key: str, fmt: str) -> str:
        return "-" if r.get(key) is None else format(r[key], fmt)

    lines = ["| variant | batch x seq | tokens/s | step ms (median, min-max) | 1st step s | MFU measured peak "
             "| MFU datasheet | peak mem GiB | final loss | status |", "|" + "---|" * 10]
    for name, r in results.items():
        step = (f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})" if "median_ms" in r else "-")
        mem = "-" if r.get("peak_mem") is None else f"{r['peak_mem'] / 2**30:.2f}"
        status = r["status"] + (f": {r['note']}" if r.get("note") else "")
        lines.append(f"| {name} | {r['batch']} x {seq_len} | {num(r, 'tokens_per_s', ',.0f')} | {step} "
                     f"| {num(r, 'first_step_s', '.2f')} | {num(r, 'mfu_measured', '.1%')} "
                     f"| {num(r, 'mfu_datasheet', '.1%')} | {mem} | {num(r, 'final_loss', '.4f')} | {status} |")
    return lines


def prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any], int, float]:
    """(config, config.json dict, parameter count, FLOPs/token); raises ValueError with one line for bad input."""
    import torch
    import transformers
    from bench_train import flops_per_token  # the same FLOPs as lmadapt's own bench

    from lmadapt.config import ConfigError, load_config
    from lmadapt.hf.common import HFError
    from lmadapt.hf.configs import config_to_hf

    try:
        cfg = load_config(args.config, args.overrides)
        hf = config_to_hf(cfg.model)
    except (ConfigError, HFError) as e:
        raise ValueError(str(e)) from None
    rest = dict(hf)
    try:
        config = transformers.AutoConfig.for_model(rest.pop("model_type"), **rest)
        with torch.device("meta"):  # shapes only: counts the parameters without allocating them
            n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    except (ValueError, TypeError, KeyError) as e:  # transformers refusing the mapped config
        raise ValueError(f"transformers cannot build {cfg.model.family} from {args.config}: {e}") from None
    return cfg, hf, n_params, flops_per_token(cfg.model, n_params, cfg.train.seq_len)


def versions() -> dict[str, Any]:
    """torch, transformers, CUDA and cuDNN versions (None where a CPU build has no CUDA)."""
    import torch
    import transformers

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "cudnn": cudnn}


def header(cfg: Any, n_params: int, report: dict[str, Any]) -> list[str]:
    """The machine, versions, model and peak lines printed above the table."""
    from benchinfo import cpu_line, gpu_line

    m, results, measured, sheet = cfg.model, report["variants"], report["matmul_peak"], report["datasheet_peak"]
    attn = "/".join(sorted({r["attn"] for r in results.values() if r.get("attn")})) or "?"
    tf32 = "; fp32 matmuls in TF32 (as XLA's default on GPU)" if report["device"] not in (None, "cpu") else ""
    return [cpu_line(), gpu_line() or "gpu: none",
            f"device: {report['device'] or '?'}; "
            + ", ".join(f"{k} {v or '-'}" for k, v in report["versions"].items()),
            f"model: {m.family} L{m.n_layers} d{m.d_model} heads {m.n_heads}/{m.kv_heads} vocab {m.vocab_size}, "
            f"{n_params / 1e6:.1f}M params fp32, compute {'bf16 autocast' if _bf16(m.dtype) else 'fp32'}"
            f"{tf32}, attention {attn}, gradient checkpointing "
            + (f"on (remat={m.remat})" if m.remat != "none" else "off"),
            f"FLOPs/token {report['flops_per_token']:.3g}; bf16 matmul peak measured "
            + (f"{measured / 1e12:,.3g} TFLOP/s" if measured else "-") + "; datasheet "
            + (f"{sheet / 1e12:,.0f} TFLOP/s" if sheet else "-")]


def parse_args() -> argparse.Namespace:
    """The command line (the hidden --child/--job/--out are how the parent starts a variant)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--steps", type=int, default=10, help=f"timed steps (after the first and {WARMUP} warm-up steps)")
    p.add_argument("--batch", type=int, help="sequences per step (default: train.batch_size)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile-timeout", type=float, default=180.0, help="seconds for compile's first steps")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    for hidden in ("--child", "--job", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    variants = args.variants.split(",")
    if args.child is None and (not args.config or set(variants) - set(VARIANTS) or args.steps < 1
                               or (args.batch is not None and args.batch < 1)):
        p.error(f"need --config, --steps >= 1, --batch >= 1 and --variants from {','.join(VARIANTS)}")
    args.variants = variants
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not installed (pip install torch transformers)", file=sys.stderr)
        return 3
    try:
        cfg, hf, n_params, fpt = prepare(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # torch or transformers broken, or lmadapt without its dependencies (jax, ...)
        print(f"error: cannot import {e.name or 'a dependency'} ({e})", file=sys.stderr)
        return 3
    args.seq_len, batch = cfg.train.seq_len, args.batch or cfg.train.batch_size
    job = {"hf": hf, "seq_len": args.seq_len, "bf16": _bf16(cfg.model.dtype),
           "remat": cfg.model.remat != "none", "steps": args.steps}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        _write(os.path.join(tmp, "job.json"), job)
        results = {}
        for v in args.variants:
            print(f"running {v} ...", file=sys.stderr, flush=True)
            results[v] = run_variant(args, v, batch, os.path.join(tmp, "job.json"), notes)
    devices = [r["device"] for r in results.values() if r.get("device")]
    device = devices[0] if devices else None
    report = {"variants": results, "device": device, "versions": versions(), "n_params": n_params,
              "flops_per_token": fpt,
              "matmul_peak": max((r["matmul_peak"] for r in results.values() if r.get("matmul_peak")), default=None),
              "datasheet_peak": next((p for key, p in DATASHEET if key in device), None) if device else None}
    for r in results.values():
        summarize(r, args.seq_len, report["flops_per_token"], (report["matmul_peak"], report["datasheet_peak"]))
    print("\n".join([*header(cfg, n_params, report), *notes, "", *table(results, args.seq_len)]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if any(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
