"""The continual benchmark: update strategies against a joint retrain at equal compute, over seeds.

    python tools/cl_bench.py [--steps 100] [--seeds 0,1] [--strategies naive,replay25,replay-rewarm]
                             [--domains books,python_docs,shakespeare,code] [--refs 1,2] [--scale]

A base version is trained on the first domain; each strategy then updates it through the others, `--steps`
steps per stage (batch 16 x 128 tokens), each stage a `train.py`-equivalent run from the previous version.
References: joint retrains from scratch on the union of all domains with `--refs` times the chain's total
compute (1: equal compute, what a user compares against; 2: twice). Every version is scored on every
domain's held-out split, giving a loss matrix R per strategy and seed. The table reports, as mean ± spread
(half the range) over seeds: final average loss and its ratio to each joint retrain, mean forgetting (rise
above the best loss after learning, Chaudhry 2018) and its ratio to naive fine-tuning's, BWT, the newest
domain's loss against naive's, wall time; then per-domain final losses beside the joint models', each
strategy's R, what an update costs against a retrain on everything seen so far, and the targets:

  * final average loss <= 1.02x the joint retrain at equal compute;
  * forgetting <= 10% of naive fine-tuning's;
  * newest-domain loss <= 1.02x naive fine-tuning's.

The seed is the model's initialisation (run.seed); the data order and the held-out split stay fixed, so
every seed is scored on the same held-out text. The default takes an estimated 35-40 minutes on 2 CPU cores; `--scale`
uses a bigger model and 5x the steps (for a GPU). Runs are resumable: published versions are reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

DOMAINS = {
    "books": {"name": "books", "path": "data/books_en.txt.xz"},
    "python_docs": {"name": "python_docs", "path": "data/python_docs.txt.xz"},
    "shakespeare": {"name": "shakespeare", "path": "data/shakespeare.txt.xz"},
    "code": {"name": "code", "path": "{stdlib}/[a-l]*.py", "documents": "file"},
}
REPLAY = ["data.replay.from_lineage=true"]
R25 = ["data.replay.fraction=0.25", *REPLAY]
STRATEGIES: dict[str, list[str]] = {
    "naive": [],
    "replay5": ["data.replay.fraction=0.05", *REPLAY],
    "replay25": R25,
    "replay50": ["data.replay.fraction=0.5", *REPLAY],
    # The recipe levers, each on top of 25% replay (docs/continual.md, "The sweep").
    "replay25+carry": [*R25, "schedule.carry=true"],
    "replay25+rewarm0.5": [*R25, "schedule.rewarm_fraction=0.5"],
    "replay25+rewarm0.25": [*R25, "schedule.rewarm_fraction=0.25"],
    "replay25+warmup0": [*R25, "schedule.warmup_steps=0"],
    "replay25+tokens": [*R25, "data.replay.spread=tokens"],
    "replay25+carry+tokens": [*R25, "schedule.carry=true", "data.replay.spread=tokens"],
    "replay25+wsd+carry": [*R25, "schedule.kind=wsd", "schedule.carry=true"],
    "replay-ramp+carry": ["data.replay.fraction=0.1", "data.replay.final_fraction=0.4", *REPLAY,
                          "schedule.carry=true"],
    "replay50+carry": ["data.replay.fraction=0.5", *REPLAY, "schedule.carry=true"],
    "replay25+wise0.8": [*R25, "continual.average.wise=0.8"],
    "replay25+ema": [*R25, "continual.average.ema=0.98"],
    "replay-ramp": ["data.replay.fraction=0.1", "data.replay.final_fraction=0.4", *REPLAY],
    "replay40+tokens": ["data.replay.fraction=0.4", *REPLAY, "data.replay.spread=tokens"],
    "replay50+tokens": ["data.replay.fraction=0.5", *REPLAY, "data.replay.spread=tokens"],
    "replay75": ["data.replay.fraction=0.75", *REPLAY],
    "replay50+lwf": ["data.replay.fraction=0.5", *REPLAY, "continual.distill.weight=0.5"],
    "replay25+optstate": [*R25, "optimizer.carry_state=true"],
    "replay25+lwf": [*R25, "continual.distill.weight=0.5"],
    "replay-rewarm": ["continual.recipe=replay-rewarm"],
    # The forgetting budget on top of the recipe: every earlier domain may rise 0.05 nats over the parent.
    "replay-rewarm+budget": ["continual.recipe=replay-rewarm", "continual.forgetting_budget.sources={earlier}",
                             "continual.forgetting_budget.max_rise=0.05", "eval.every={eval_every}"],
    "l2sp": ["continual.l2sp=1.0"],
    "ewc": ["continual.ewc=0.01", "continual.fisher.compute=true", "continual.fisher.batches=2"],
    "lwf": ["continual.distill.weight=1.0", "continual.distill.temperature=2.0"],
    "lora": ["continual.lora.rank=8", "continual.lora.targets=[q, k, v, o, gate, up, down]"],
}
DEFAULT = "naive,replay25,replay-rewarm"
BATCH, SEQ = 16, 128


def source_yaml(d: dict[str, str]) -> str:
    extra = f", documents: {d['documents']}" if "documents" in d else ""
    return f"{{name: {d['name']}, path: '{d['path']}'{extra}}}"


def base_overrides(args: argparse.Namespace, lineage: str, tokenizer_path: str) -> list[str]:
    model = (["model.d_model=256", "model.n_layers=8", "model.n_heads=8", "model.d_ff=768", "model.vocab_size=4096"]
             if args.scale else ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                                 "model.d_ff=384", "model.vocab_size=1024"])
    return [*model, "tokenizer.kind=sentencepiece", f"tokenizer.path={tokenizer_path}", f"train.batch_size={BATCH}",
            f"train.seq_len={SEQ}", f"train.steps={args.steps}", "optimizer.lr=2.0e-3", "schedule.warmup_steps=10",
            "eval.every=0", "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false",
            f"eval.batches={args.eval_batches}", f"lineage.dir={lineage}", f"data.cache_dir={args.out}/cache",
            "lineage.save_opt_state=true", "mesh.data=-1"]


def train_version(args, lineage: str, vid: str, overrides: list[str]) -> float:
    """Train and publish version `vid` (unless published already); its training wall time."""
    from lmadapt.config import load_config
    from lmadapt.lineage.store import Lineage
    from lmadapt.trainer import train

    if Lineage(lineage).exists(vid):  # reused: its run's start (the lock file it took) to its publication
        created = datetime.datetime.fromisoformat(Lineage(lineage).record(vid)["created"]).timestamp()
        lock = os.path.join(os.path.dirname(lineage), "runs", vid, "train.lock")
        return max(created - os.path.getmtime(lock), 0.0) if os.path.exists(lock) else float("nan")
    tok = os.path.join(args.out, "tokenizer.model")
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                      [*base_overrides(args, lineage, tok), f"run.dir={os.path.dirname(lineage)}/runs/{vid}",
                       f"version.id={vid}", *overrides])
    t = time.perf_counter()
    train(cfg, log=lambda s: None)
    return time.perf_counter() - t


def score_row(args, lineage: str, vid: str, domains: list[dict[str, str]]) -> list[float]:
    from lmadapt.config import SourceConfig
    from lmadapt.eval.report import evaluate_versions
    from lmadapt.lineage.store import Lineage

    rows = evaluate_versions(Lineage(lineage), [vid], [SourceConfig(**d) for d in domains], seq_len=SEQ,
                             batch_size=BATCH, max_batches=args.eval_batches, val_fraction=0.05, seed=0,
                             cache_dir=f"{args.out}/cache", log=lambda s: None)
    by = {r["dataset"]: r["loss"] for r in rows}
    return [by[d["name"]] for d in domains]


def run_chain(args, lineage: str, name: str, domains: list[dict[str, str]], seed: int) -> dict[str, Any]:
    """One strategy through the domains after the base, from version `base`: R, walls, the report numbers."""
    from lmadapt.eval.metrics import continual_report
    from lmadapt.lineage.store import Lineage

    rows, walls, parent = [score_row(args, lineage, "base", domains)], [], "base"
    for k, d in enumerate(domains[1:], start=1):
        vid = f"{name}-{k}".replace("+", "_")
        earlier = "[" + ", ".join(x["name"] for x in domains[:k]) + "]"
        extra = [o.format(earlier=earlier, eval_every=max(args.steps // 5, 1)) for o in STRATEGIES[name]]
        if "continual.ewc" in " ".join(extra) and "fisher" not in Lineage(lineage).record(parent).get("artifacts", []):
            extra = [o for o in extra if not o.startswith("continual.ewc")]  # the base has no Fisher yet
        walls.append(train_version(args, lineage, vid, [f"init.from_version={parent}", f"run.seed={seed}",
                                                        f"data.sources=[{source_yaml(d)}]", *extra]))
        rows.append(score_row(args, lineage, vid, domains))
        parent = vid
    R = np.asarray(rows)
    rep = continual_report(R, [f"v{i}" for i in range(len(domains))], [d["name"] for d in domains],
                           list(range(len(domains))), higher_is_better=False).to_dict()
    return {"R": R.tolist(), "final": R[-1].tolist(), "avg": float(R[-1].mean()), "newest": float(R[-1][-1]),
            "forgetting": rep["mean_forgetting"], "bwt": rep["backward_transfer"], "stage_wall_s": walls,
            "wall_s": float(sum(walls))}


def run_seed(args, seed: int, domains: list[dict[str, str]], strategies: list[str], refs: list[float]
             ) -> dict[str, Any]:
    """Base, every strategy's chain and the joint references for one seed (in `<out>/seed<seed>`)."""
    lineage = os.path.join(args.out, f"seed{seed}", "lineage")
    base_wall = train_version(args, lineage, "base", [f"data.sources=[{source_yaml(domains[0])}]", f"run.seed={seed}"])
    out: dict[str, Any] = {"base_wall_s": base_wall, "strategies": {}, "joint": {}}
    for name in strategies:
        out["strategies"][name] = run_chain(args, lineage, name, domains, seed)
        r = out["strategies"][name]
        print(f"seed {seed} {name:>24}: final avg {r['avg']:.4f}, forgetting {r['forgetting']:+.4f}, "
              f"newest {r['newest']:.4f}, {r['wall_s']:.0f} s", flush=True)
    union = ", ".join(source_yaml(d) for d in domains)
    for m in refs:
        steps = int(round(len(domains) * args.steps * m))
        vid = f"joint-{m:g}x"
        wall = train_version(args, lineage, vid, [f"data.sources=[{union}]", f"train.steps={steps}",
                                                  f"run.seed={seed}"])
        row = score_row(args, lineage, vid, domains)
        out["joint"][f"{m:g}"] = {"final": row, "avg": float(np.mean(row)), "steps": steps, "wall_s": wall}
        print(f"seed {seed} {vid:>24}: final avg {np.mean(row):.4f}, {wall:.0f} s", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps per stage")
    parser.add_argument("--seeds", default="0,1", help="model initialisation seeds (run.seed)")
    parser.add_argument("--strategies", default=DEFAULT, help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="the sequence, base domain first")
    parser.add_argument("--refs", default="1,2", help="joint retrains, as multiples of one chain's compute (empty: "
                        "none, and no report)")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", default="runs/cl_bench")
    parser.add_argument("--scale", action="store_true", help="bigger model and 5x the steps (GPU)")
    args = parser.parse_args()
    if args.scale:
        args.steps *= 5
    args.out = os.path.abspath(args.out)
    bad = [s for s in args.strategies.split(",") if s not in STRATEGIES] + [
        d for d in args.domains.split(",") if d not in DOMAINS]
    if bad:
        print(f"error: unknown strategy or domain {bad[0]!r} (strategies: {', '.join(STRATEGIES)}; domains: "
              f"{', '.join(DOMAINS)})", file=sys.stderr)
        return 2
    domains = [DOMAINS[d] for d in args.domains.split(",")]
    strategies, refs = args.strategies.split(","), [float(x) for x in args.refs.split(",") if x]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    import jax

    # Every stage of every chain compiles the same few programs: compile each once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    make_tokenizer(args, domains)
    t0 = time.perf_counter()
    results = {s: run_seed(args, s, domains, strategies, refs) for s in seeds}
    if not refs:  # (a run that only adds versions, e.g. beside another process on the same --out)
        return 0
    from cl_report import report

    text = report(results, args, [d["name"] for d in domains], time.perf_counter() - t0)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "seeds": results}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


def make_tokenizer(args: argparse.Namespace, domains: list[dict[str, str]]) -> None:
    """One tokenizer for every domain and seed, so losses are comparable across versions."""
    from lmadapt.config import SourceConfig
    from lmadapt.data.sources import read_source
    from lmadapt.data.tokenizers import train_sentencepiece

    tok = os.path.join(args.out, "tokenizer.model")
    if not os.path.isfile(tok):
        texts = [doc.text for d in DOMAINS.values() for doc in read_source(SourceConfig(**d)).documents]
        with open(tok + ".tmp", "wb") as f:
            f.write(train_sentencepiece(texts, 4096 if args.scale else 1024).model_proto)
        os.replace(tok + ".tmp", tok)


if __name__ == "__main__":
    sys.exit(main())
