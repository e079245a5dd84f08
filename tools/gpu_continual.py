"""A continual update end to end through lmadapt's own CLIs: the stage of the GPU check (tools/gpu_check.py) that
catches device-only bugs which unit tests on a CPU cannot see: buffer donation across a real train loop, async
Orbax checkpoints saved while steps run, cuDNN attention masked by packed rows' segment ids, the custom-VJP
projection under bfloat16, and the export of bf16-trained weights read back by transformers.

    python tools/gpu_continual.py --out DIR [--tiny] [--time-limit S] [key=value ...]

Steps, each a subprocess with its own time limit, its output in DIR/logs/<step>.log:
  base      train.py: configs/gpu-continual.yaml's stage `base` (Shakespeare), published as version `base`.
  update    train.py: stage `update` from `base` on the Python docs, 25% replay of the lineage's data + LwF.
  eval      eval.py: every published version on both domains' held-out splits (the loss table).
  export    tools/lineage.py export of `update` to a Hugging Face directory.
  check_hf  tools/check_hf.py: `update` in lmadapt vs the export in transformers (exit 3, no torch: "not run").
Each stage runs as its own train.py call (the config with `stages=[]` and the stage's overrides, as
lmadapt.stages would), so each has its own exit code, wall time and log. A failed step skips the steps that
need it ("skipped (needs X)"), not the others. Extra key=value overrides go to both training steps and eval.

--tiny: CPU sizes (d 64, 2 layers, seq 128, batch 8, 30 + 20 steps, float32, attention auto), the dry run that
must pass before a GPU is booked: a minute or two on 2 cores. --time-limit (seconds, all steps together) is
shared out by SHARES; time a step leaves unused goes to the later ones.
DIR (new or empty) gets logs/, run/<stage>/, lineage/, cache/ (tokenizer and tokens: cold, like a fresh GPU
machine), eval/, hf/ and summary.json = {"steps": [{"name", "rc", "wall_s", "note"}], "losses": {version:
{domain: loss}}, "ok"}. Exit 0 iff every step passed; 1 otherwise; 2 when DIR exists and is not empty.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "gpu-continual.yaml")
STAGES = ("base", "update")  # the config's stages, in order
# CPU sizes: the same model family and run shape as the GPU config, small enough for 2 cores. cuDNN needs a GPU
# (and bf16), so attention is `auto` and compute float32.
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
        "model.vocab_size=512", "tokenizer.vocab_size=512", "model.max_seq_len=128", "train.seq_len=128",
        "train.batch_size=8", "model.dtype=float32", "model.attention=auto", "checkpoint.every=10",
        "eval.every=10", "eval.batches=2", "logging.every=5"]
TINY_STEPS = {"base": ["train.steps=30", "schedule.warmup_steps=3"],
              "update": ["train.steps=20", "schedule.warmup_steps=2"]}
# Share of the time limit per step: training dominates (compile + steps); check_hf imports torch and compiles
# one forward per text length.
SHARES = {"base": 0.32, "update": 0.32, "eval": 0.12, "export": 0.07, "check_hf": 0.17}
NEEDS = {"update": "base", "eval": "base", "export": "update", "check_hf": "export"}
MARGIN_S = 3.0  # kept back so that the summary is written before a caller's own limit (gpu_check) strikes


def stage_overrides(config: str) -> dict[str, list[str]]:
    """Each stage's overrides, as the config's `stages:` list spells them."""
    with open(config, encoding="utf-8") as f:
        stages = yaml.safe_load(f)["stages"]
    found = {s["name"]: [str(o) for o in s.get("overrides") or []] for s in stages}
    missing = [s for s in STAGES if s not in found]
    if missing:
        raise SystemExit(f"error: {config} has no stage {', '.join(missing)}")
    return found


def step_commands(out: str, tiny: bool, extra: list[str], evaluated: list[str]) -> dict[str, list[str]]:
    """Every step's command line (run from the repo root). `evaluated`: the versions eval.py scores."""
    lineage, hf = os.path.join(out, "lineage"), os.path.join(out, "hf")
    # Later overrides win: the stage's, then the CPU sizes, then the caller's, then where this run writes.
    sizes = TINY if tiny else []
    where = [f"lineage.dir={lineage}", f"data.cache_dir={os.path.join(out, 'cache')}"]
    py, stages = sys.executable, stage_overrides(CONFIG)
    cmds = {name: [py, "train.py", "--config", CONFIG, "stages=[]", *stages[name], *sizes,
                   *(TINY_STEPS[name] if tiny else []), *extra, f"version.id={name}",
                   f"run.dir={os.path.join(out, 'run', name)}", *where] for name in STAGES}
    # eval.py reads the datasets from every stage of the config: Shakespeare and the Python docs.
    cmds["eval"] = [py, "eval.py", "--lineage", lineage, "--versions", ",".join(evaluated), "--config", CONFIG,
                    "--out", os.path.join(out, "eval"), *sizes, *extra, *where]
    cmds["export"] = [py, "tools/lineage.py", "--dir", lineage, "export", "update", "--out", hf]
    cmds["check_hf"] = [py, "tools/check_hf.py", hf, "--lineage", lineage, "--version", "update"]
    return cmds


def run_step(name: str, cmd: list[str], limit: float, logs: str) -> dict[str, Any]:
    """Run one step for at most `limit` seconds, its output streamed to logs/<name>.log; rc 124 on a timeout."""
    path = os.path.join(logs, f"{name}.log")
    t = time.monotonic()
    with open(path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # Its own process group, so that a timeout also ends whatever the step started.
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = 124
    wall = time.monotonic() - t
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return {"name": name, "rc": rc, "wall_s": round(wall, 1), "note": step_note(name, rc, text, limit)}


def step_note(name: str, rc: int, text: str, limit: float) -> str:
    """What the table says about a finished step: why it failed, or its headline when it passed."""
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    if rc == 124:
        return f"timed out after {limit:.0f} s"
    if name == "check_hf" and rc in (0, 1, 3):
        return check_hf_note(rc, lines)
    if rc == 0:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":")[0]]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:200]


def check_hf_note(rc: int, lines: list[str]) -> str:
    """check_hf's headline: the max logit difference, each comparison that failed, the verdict."""
    diff = re.search(r"max \|diff\| (\S+)", "\n".join(lines))
    failed = [ln.split(":")[0] for ln in lines if ln.startswith(("tokenizer:", "logits:", "generation"))
              and not ln.endswith("[ok]")]
    parts = ([f"max logit diff {diff.group(1)}"] if diff else []) + [f"{f} differs" for f in failed]
    parts += [ln for ln in lines if ln.startswith("result:")][-1:]
    if rc == 3:
        parts.insert(0, "transformers not run (torch missing)")
    elif rc == 1 and not parts:
        parts = lines[-1:]
    return "; ".join(parts)[:200]


def passed(step: dict[str, Any]) -> bool:
    """A step passed: exit 0, or check_hf's exit 3 (torch missing: not run, not failed)."""
    return step["rc"] == 0 or (step["name"] == "check_hf" and step["rc"] == 3)


def losses(out: str) -> dict[str, dict[str, float]]:
    """{version: {domain: held-out loss}} from eval.py's results.json (empty when it wrote none)."""
    path = os.path.join(out, "eval", "results.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["lm"]
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["version"], {})[row["dataset"]] = row["loss"]
    return table


def tables(summary: dict[str, Any]) -> str:
    """The step table, then the loss table (rows: versions; columns: domains)."""
    lines = ["| step | exit code | wall s | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {'-' if s['rc'] is None else s['rc']} | {s['wall_s']:.1f} | "
              f"{s['note'].replace('|', '/')} |"
              for s in summary["steps"]]
    table = summary["losses"]
    domains = sorted({d for row in table.values() for d in row})
    if domains:
        lines += ["", "| version | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        lines += [f"| {v} | " + " | ".join(f"{row[d]:.4f}" if d in row else "-" for d in domains) + " |"
                  for v, row in table.items()]
    return "\n".join(lines)


def run_all(out: str, tiny: bool, extra: list[str], time_limit: float) -> dict[str, Any]:
    """Run the steps in order, skipping those whose prerequisite failed; the summary."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    deadline = time.monotonic() + time_limit - MARGIN_S
    steps: list[dict[str, Any]] = []
    ok: dict[str, bool] = {}
    for name in SHARES:
        need = NEEDS.get(name)
        left = deadline - time.monotonic()
        if need and not ok.get(need):
            steps.append({"name": name, "rc": None, "wall_s": 0.0, "note": f"skipped (needs {need})"})
            continue
        if left < 1:
            steps.append({"name": name, "rc": None, "wall_s": 0.0, "note": "skipped (time limit spent)"})
            continue
        # This step's share of what is left, among the steps still to come: slack flows to later steps.
        later = [n for n in SHARES if list(SHARES).index(n) >= list(SHARES).index(name)]
        limit = left * SHARES[name] / sum(SHARES[n] for n in later)
        evaluated = [v for v in STAGES if ok.get(v)]
        step = run_step(name, step_commands(out, tiny, extra, evaluated)[name], limit, logs)
        if name == "eval" and not ok.get("update"):
            step["note"] = (step["note"] + "; " if step["note"] else "") + "update not scored (needs update)"
        ok[name] = passed(step)
        steps.append(step)
        print(f"{name}: rc {step['rc']} in {step['wall_s']:.1f} s {step['note']}", flush=True)
    return {"steps": steps, "losses": losses(out),
            "ok": all(s["rc"] is not None and passed(s) for s in steps)}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, refuse a used --out, run the steps, print and write the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a new (or empty) folder for logs, runs, lineage, summary.json")
    p.add_argument("--tiny", action="store_true", help="CPU sizes: the dry run")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for all steps together (default 600)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both training steps and eval")
    args = p.parse_args(argv)
    if os.path.lexists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        print(f"error: --out {args.out} exists and is not an empty folder; give a new one (nothing was written)",
              file=sys.stderr)
        return 2
    if args.time_limit <= MARGIN_S + 1:
        print(f"error: --time-limit {args.time_limit:g}: expected more than {MARGIN_S + 1:g} seconds", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    summary = run_all(out, args.tiny, args.overrides, args.time_limit)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(tables(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
