"""The GPU check: lmadapt's speed, memory and correctness on one NVIDIA GPU, side by side with torch, in one run.

    python tools/gpu_check.py --out OUT [--work /tmp/gpu_check] [--stages env,train,torch,continual,tests]
    python tools/gpu_check.py --tiny --out /tmp/gc-out     # the dry run on CPU, tiny sizes, before a GPU is booked

Stages, each a subprocess with its own time limit (the remaining --budget caps it), each one's log kept:
- env: Python, JAX and torch versions, the devices, the packages lmadapt imports that are missing. Wheels in
  `.whl/` (the image has no network; see docs/performance.md) are installed to WORK/site first.
- train: tools/bench_train.py on configs/model/llama-1b.yaml, seq 2048, fp32 params, bf16 compute:
  attention cudnn with remat none (batch grown to what fits, --fit-batch; a jax.profiler trace of 3 steps,
  top ops printed), then cudnn with remat dots and auto with remat none at that batch.
- torch: tools/bench_torch_train.py, the same shape in transformers (bf16 autocast, SDPA), eager and
  torch.compile (180 s to compile), at the batch train ran.
- continual: tools/gpu_continual.py: a base version, an update with replay 25% + LwF, publish, eval.py on
  both domains, export to Hugging Face and check it back.
- tests: the model, sharding, train-step and generation tests on the device (LMADAPT_TEST_DEVICE=gpu).
OUT gets at most 4 files (the device tool returns 8): summary.md (the tables), summary.json, logs.txt (every
stage's output) and the profile's top ops inside summary.json. Everything else goes to --work.
Exit status: 0 when every stage ran and passed; 1 otherwise (the tables say which); 2 bad arguments.

--tiny: the same stages at CPU sizes (2 layers, d 128, seq 256; attention xla instead of cudnn; the test
files on one CPU device, which is how the one-GPU run sees them), a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)

from gpu_check_report import render  # noqa: E402

STAGES = ("env", "train", "torch", "continual", "tests")
LIMITS = {"env": 60, "train": 330, "torch": 260, "continual": 240, "tests": 240}  # seconds, GPU sizes
MODEL = os.path.join(ROOT, "configs", "model", "llama-1b.yaml")
GPU_SHAPE = ["train.seq_len=2048", "model.dtype=bfloat16", "model.param_dtype=float32", "train.batch_size=4"]
TINY_SHAPE = ["train.seq_len=256", "model.dtype=bfloat16", "model.param_dtype=float32", "train.batch_size=2",
              "model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=256",
              "model.vocab_size=512"]
# (name, overrides): the first is fitted to the device's memory and profiled; the others run at its batch.
VARIANTS = (("cudnn, remat none", ["model.attention=cudnn", "model.remat=none"]),
            ("cudnn, remat dots", ["model.attention=cudnn", "model.remat=dots"]),
            ("auto, remat none", ["model.attention=auto", "model.remat=none"]))
GPU_TESTS = ["tests/test_model.py", "tests/test_sharding.py", "tests/test_train_step.py", "tests/test_generate.py"]
TINY_TESTS = ["tests/test_train_step.py"]
REQUIRED = ("jax", "flax", "optax", "orbax.checkpoint", "sentencepiece", "tokenizers", "google.protobuf", "numpy",
            "yaml", "tqdm", "matplotlib", "safetensors", "torch", "transformers", "pytest", "hypothesis")


class Runner:
    """Runs stages as subprocesses under one time budget, collecting their logs and results."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start, self.logs = args, time.monotonic(), []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.95",
                        JAX_COMPILATION_CACHE_DIR=os.path.join(args.work, "jax-cache"))
        if args.tiny:
            self.env["JAX_PLATFORMS"] = "cpu"

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def run(self, title: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run `cmd` for at most `limit` seconds (and what the budget has left); its rc, wall time and output."""
        limit = max(1.0, min(limit, self.left() - 5))
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=limit,
                               check=False)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            out = _text(e.stdout) + _text(e.stderr) + f"\n[gpu_check: stopped after {limit:.0f} s]\n"
        wall = time.monotonic() - t
        self.logs.append(f"===== {title} (rc {rc}, {wall:.1f} s)\n$ {' '.join(cmd)}\n{out}")
        print(f"[{time.monotonic() - self.start:6.0f} s] {title}: rc {rc} in {wall:.1f} s", flush=True)
        return {"rc": rc, "wall_s": wall, "output": out}


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def stage_env(r: Runner) -> dict[str, Any]:
    """Install carried wheels (if any), then report versions, devices and missing packages."""
    wheels = os.path.join(ROOT, ".whl")
    result: dict[str, Any] = {"installed": []}
    if os.path.isdir(wheels) and any(n.endswith(".whl") for n in os.listdir(wheels)):
        site = os.path.join(r.args.work, "site")
        names = sorted(os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl"))
        pip = r.run("env: install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                            "--no-compile", "--target", site, *names], 120)
        if pip["rc"] == 0:
            r.env["PYTHONPATH"] = site + os.pathsep + r.env.get("PYTHONPATH", "")
            result["installed"] = [os.path.basename(n) for n in names]
    probe = ("import importlib, json, platform, sys\nout = {'python': platform.python_version(), 'missing': []}\n"
             f"for name in {REQUIRED!r}:\n"
             "    try:\n        m = importlib.import_module(name)\n        out[name] = getattr(m, '__version__', '?')\n"
             "    except Exception as e:\n        out['missing'].append(f'{name} ({type(e).__name__})')\n"
             "import jax\nout['devices'] = [f'{d.device_kind} ({d.platform})' for d in jax.devices()]\n"
             "print('ENV ' + json.dumps(out))\n")
    run = r.run("env", [sys.executable, "-c", probe], LIMITS["env"])
    line = next((ln for ln in run["output"].splitlines() if ln.startswith("ENV ")), None)
    result.update(json.loads(line[4:]) if line else {})
    from benchinfo import cpu_line, gpu_line

    result.update(rc=run["rc"], wall_s=run["wall_s"], cpu=cpu_line(), gpu=gpu_line() or "gpu: none")
    result["ok"] = run["rc"] == 0 and bool(line) and not result.get("missing")
    return result


def stage_train(r: Runner) -> dict[str, Any]:
    """bench_train on each variant: the first fitted to memory and profiled, the others at its batch."""
    shape = TINY_SHAPE if r.args.tiny else GPU_SHAPE
    rows, batch = [], None
    for i, (name, extra) in enumerate(VARIANTS):
        if r.args.tiny:  # cuDNN needs a GPU: the dry run takes XLA's attention in its place
            extra = [e.replace("attention=cudnn", "attention=xla") for e in extra]
            name = name.replace("cudnn", "xla (cudnn on a GPU)")
        out = os.path.join(r.args.work, f"train-{i}.json")
        flags = ["--fit-batch", "--max-batch", "64", "--profile", os.path.join(r.args.work, "trace")] if i == 0 else []
        over = [*shape, *extra, *([f"train.batch_size={batch}"] if batch else [])]
        cmd = [sys.executable, os.path.join(TOOLS, "bench_train.py"), "--config", MODEL, "--steps",
               "2" if r.args.tiny else "5", "--no-pipeline", "--no-eval", "--json", out, *flags, *over]
        if os.path.exists(out):
            os.remove(out)
        run = r.run(f"train: {name}", cmd, LIMITS["train"] * (0.45 if i == 0 else 0.27))
        row = {"variant": name, "rc": run["rc"], "wall_s": run["wall_s"]}
        if run["rc"] == 0 and os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                row.update(json.load(f))
            batch = batch or row["batch"]
        else:
            row["error"] = _last_line(run["output"])
        rows.append(row)
    return {"rows": rows, "batch": batch, "ok": all(row["rc"] == 0 for row in rows),
            "rc": max(row["rc"] for row in rows), "wall_s": sum(row["wall_s"] for row in rows)}


def stage_torch(r: Runner, batch: int | None) -> dict[str, Any]:
    """The same shape in transformers + torch, eager and compiled, at the batch the JAX run used."""
    shape = TINY_SHAPE if r.args.tiny else GPU_SHAPE
    out = os.path.join(r.args.work, "torch.json")
    cmd = [sys.executable, os.path.join(TOOLS, "bench_torch_train.py"), "--config", MODEL, "--steps",
           "2" if r.args.tiny else "5", "--variants", "eager,compile", "--compile-timeout", "180", "--json", out,
           *(["--batch", str(batch)] if batch else []), *shape, "model.remat=none"]
    run = r.run("torch", cmd, LIMITS["torch"])
    result: dict[str, Any] = {"rc": run["rc"], "wall_s": run["wall_s"]}
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            result.update(json.load(f))
    else:
        result["error"] = _last_line(run["output"])
    result["ok"] = run["rc"] == 0
    return result


def stage_continual(r: Runner) -> dict[str, Any]:
    out = os.path.join(r.args.work, "continual")
    cmd = [sys.executable, os.path.join(TOOLS, "gpu_continual.py"), "--out", out,
           "--time-limit", str(int(LIMITS["continual"] - 10)), *(["--tiny"] if r.args.tiny else [])]
    run = r.run("continual", cmd, LIMITS["continual"])
    result: dict[str, Any] = {"rc": run["rc"], "wall_s": run["wall_s"]}
    path = os.path.join(out, "summary.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            result.update(json.load(f))
    result["ok"] = run["rc"] == 0
    return result


def stage_tests(r: Runner) -> dict[str, Any]:
    """The numerics tests on the device; the tiny run emulates one device on the CPU."""
    env = dict(r.env, LMADAPT_TEST_DEVICE="cpu" if r.args.tiny else "gpu")
    if r.args.tiny:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    else:
        env.pop("JAX_PLATFORMS", None)
    files = TINY_TESTS if r.args.tiny else GPU_TESTS
    run = r.run("tests", [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rfEs", "-p", "no:cacheprovider",
                                *files],
                LIMITS["tests"], env=env)
    summary = _last_line(run["output"])
    return {"rc": run["rc"], "wall_s": run["wall_s"], "summary": summary, "files": files, "ok": run["rc"] == 0}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where summary.md, summary.json and logs.txt go (a new folder)")
    p.add_argument("--work", default=os.path.join("/tmp", "gpu_check"), help="scratch: runs, lineages, traces")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for all stages together")
    p.add_argument("--batch", type=int, help="torch's batch when the train stage is not run")
    p.add_argument("--tiny", action="store_true", help="CPU sizes: the dry run")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"--out {args.out} exists and is not an empty folder; nothing was written")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    r = Runner(args)
    results: dict[str, Any] = {"tiny": args.tiny, "stages": args.stages}
    for stage in args.stages:
        if r.left() < 10:
            results[stage] = {"ok": False, "error": "skipped: the time budget is spent"}
        elif stage == "torch":
            results[stage] = stage_torch(r, results.get("train", {}).get("batch") or args.batch)
        else:
            results[stage] = globals()[f"stage_{stage}"](r)
    results["wall_s"] = time.monotonic() - r.start
    text = render(results)
    print(text)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "logs.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(r.logs))
    return 0 if all(results[s].get("ok") for s in args.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
