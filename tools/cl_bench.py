"""The continual benchmark on the bundled data: strategies compared at equal compute per stage.

    python tools/cl_bench.py [--steps 60] [--strategies naive,replay25,...] [--out runs/cl_bench] [--scale]

A base version is trained on books; then each strategy updates it through three more domains
(Python documentation, Shakespeare, Python source code), `--steps` steps per stage. The reference is
a joint retrain from scratch on the union of all four with `--ref-multiplier` times the continual
compute. After every stage the new version is scored on every domain's held-out split, giving a loss
matrix R per strategy, from which the table reports: final average loss, mean forgetting (max-based,
Chaudhry 2018, on losses: rise above the best loss after learning), BWT, loss on the newest domain,
tokens and relative compute, wall time; then checks the targets:

  * best strategy's final average loss within 1% of the joint retrain at <= 60% of its compute;
  * forgetting cut by >= 80% against naive fine-tuning;
  * newest-domain loss within 2% of naive fine-tuning.

The small default finishes in about 25 minutes on 2 CPU cores; `--scale` uses a bigger model and
more steps (for a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DOMAINS = [
    {"name": "books", "path": "data/books_en.txt.xz"},
    {"name": "python_docs", "path": "data/python_docs.txt.xz"},
    {"name": "shakespeare", "path": "data/shakespeare.txt.xz"},
    {"name": "code", "path": "{stdlib}/[a-l]*.py", "documents": "file"},
]
REPLAY = ["data.replay.from_lineage=true"]
STRATEGIES: dict[str, list[str]] = {
    "naive": [],
    "replay5": ["data.replay.fraction=0.05", *REPLAY],
    "replay25": ["data.replay.fraction=0.25", *REPLAY],
    "l2sp": ["continual.l2sp=1.0"],
    "ewc": ["continual.ewc=0.01", "continual.fisher.compute=true", "continual.fisher.batches=2"],
    "lwf": ["continual.distill.weight=1.0", "continual.distill.temperature=2.0"],
    "freeze_lower": ["optimizer.groups=[{name: lower, select: [embeddings, 'layers:0-1'], frozen: true}]"],
    "lora": ["continual.lora.rank=8", "continual.lora.targets=[q, k, v, o, gate, up, down]"],
    "constant_lr": ["schedule.kind=constant", "schedule.warmup_steps=0", "optimizer.lr=3.0e-4"],
    "wsd_rewarm": ["schedule.kind=wsd"],
    "replay25+lwf": ["data.replay.fraction=0.25", *REPLAY, "continual.distill.weight=0.5"],
}


def source_yaml(d: dict[str, str]) -> str:
    extra = f", documents: {d['documents']}" if "documents" in d else ""
    return f"{{name: {d['name']}, path: '{d['path']}'{extra}}}"


def base_overrides(args: argparse.Namespace, out: str, tokenizer_path: str) -> list[str]:
    model = (["model.d_model=256", "model.n_layers=8", "model.n_heads=8", "model.d_ff=768", "model.vocab_size=4096"]
             if args.scale else ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                                 "model.d_ff=384", "model.vocab_size=1024"])
    return [*model, "tokenizer.kind=sentencepiece", f"tokenizer.path={tokenizer_path}", "train.batch_size=16",
            "train.seq_len=128", f"train.steps={args.steps}", "optimizer.lr=2.0e-3", "schedule.warmup_steps=10",
            "eval.every=0", "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false",
            f"eval.batches={args.eval_batches}", f"lineage.dir={out}/lineage", f"data.cache_dir={out}/cache",
            "mesh.data=-1"]


def train_version(args, out, tok, vid, overrides, log) -> float:
    from lmadapt.config import load_config
    from lmadapt.trainer import train

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
                      [*base_overrides(args, out, tok), f"run.dir={out}/runs/{vid}", f"version.id={vid}", *overrides])
    t = time.perf_counter()
    train(cfg, log=log)
    return time.perf_counter() - t


def score_row(args, out, vid) -> list[float]:
    from lmadapt.config import SourceConfig
    from lmadapt.eval.report import evaluate_versions
    from lmadapt.lineage.store import Lineage

    sources = [SourceConfig(**d) for d in DOMAINS]
    rows = evaluate_versions(Lineage(f"{out}/lineage"), [vid], sources, seq_len=128, batch_size=16,
                             max_batches=args.eval_batches, val_fraction=0.05, seed=0, cache_dir=f"{out}/cache",
                             log=lambda s: None)
    by = {r["dataset"]: r["loss"] for r in rows}
    return [by[d["name"]] for d in DOMAINS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per stage")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--ref-multiplier", type=float, default=2.0,
                        help="joint retrain compute as a multiple of one continual chain's")
    parser.add_argument("--out", default="runs/cl_bench")
    parser.add_argument("--scale", action="store_true", help="bigger model and 5x the steps (GPU)")
    args = parser.parse_args()
    if args.scale:
        args.steps *= 5
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    quiet = lambda s: None  # noqa: E731
    from lmadapt.config import SourceConfig
    from lmadapt.data.sources import read_source
    from lmadapt.data.tokenizers import train_sentencepiece
    from lmadapt.eval.metrics import continual_report
    from lmadapt.lineage.store import Lineage

    tok = os.path.join(out, "tokenizer.model")
    if not os.path.isfile(tok):  # one tokenizer for every domain, so losses are comparable across versions
        texts = [doc.text for d in DOMAINS for doc in read_source(SourceConfig(**d)).documents]
        with open(tok, "wb") as f:
            f.write(train_sentencepiece(texts, 4096 if args.scale else 1024).model_proto)
    lineage = Lineage(f"{out}/lineage")
    results: dict[str, dict[str, Any]] = {}
    chain_tokens = 4 * args.steps * 16 * 128

    if not lineage.exists("base"):
        train_version(args, out, tok, "base", [f"data.sources=[{source_yaml(DOMAINS[0])}]"], quiet)
    base_row = score_row(args, out, "base")
    for name in args.strategies.split(","):
        t0, rows = time.perf_counter(), [base_row]
        parent = "base"
        for k, d in enumerate(DOMAINS[1:], start=1):
            vid = f"{name}-{k}".replace("+", "_")
            if not lineage.exists(vid):
                extra = STRATEGIES[name]
                if "continual.ewc" in " ".join(extra) and parent == "base" and "fisher" not in lineage.record(
                        "base").get("artifacts", []):
                    extra = [o for o in extra if not o.startswith("continual.ewc")]  # base has no Fisher yet
                train_version(args, out, tok, vid, [f"init.from_version={parent}",
                                                    f"data.sources=[{source_yaml(d)}]", *extra], quiet)
            rows.append(score_row(args, out, vid))
            parent = vid
        R = np.asarray(rows)
        rep = continual_report(R, ["base", "s1", "s2", "s3"], [d["name"] for d in DOMAINS], [0, 1, 2, 3],
                               higher_is_better=False).to_dict()
        results[name] = {"final": R[-1].tolist(), "avg": float(R[-1].mean()), "forgetting": rep["mean_forgetting"],
                         "bwt": rep["backward_transfer"], "newest": float(R[-1][-1]), "tokens": chain_tokens,
                         "wall_s": time.perf_counter() - t0, "R": R.tolist()}
        print(f"{name:>14}: final avg loss {results[name]['avg']:.4f}, forgetting {rep['mean_forgetting']:+.4f}, "
              f"newest {R[-1][-1]:.4f}", flush=True)

    ref_steps = int(round(4 * args.steps * args.ref_multiplier))
    if not lineage.exists("joint"):
        union = ", ".join(source_yaml(d) for d in DOMAINS)
        train_version(args, out, tok, "joint", [f"data.sources=[{union}]", f"train.steps={ref_steps}"], quiet)
    joint = score_row(args, out, "joint")
    ref_avg, ref_tokens = float(np.mean(joint)), ref_steps * 16 * 128
    return report(results, ref_avg, ref_tokens, joint, out)


def report(results: dict[str, dict[str, Any]], ref_avg: float, ref_tokens: int, joint: list[float],
           out: str) -> int:
    from lmadapt.eval.classification import markdown_table

    naive = results.get("naive")
    rows = []
    for name, r in results.items():
        rows.append({"strategy": name, "final_avg_loss": r["avg"], "gap_to_joint": r["avg"] / ref_avg - 1,
                     "forgetting": r["forgetting"], "bwt": r["bwt"], "newest_loss": r["newest"],
                     "tokens": r["tokens"], "compute_vs_joint": r["tokens"] / ref_tokens, "wall_s": r["wall_s"]})
    rows.append({"strategy": "joint (reference)", "final_avg_loss": ref_avg, "gap_to_joint": 0.0,
                 "newest_loss": joint[-1], "tokens": ref_tokens, "compute_vs_joint": 1.0})
    cols = ["strategy", "final_avg_loss", "gap_to_joint", "forgetting", "bwt", "newest_loss", "tokens",
            "compute_vs_joint", "wall_s"]
    table = markdown_table(rows, cols)
    print(table)
    best = min(results, key=lambda n: results[n]["avg"])
    lines = [f"best strategy by final average loss: {best}"]
    b = results[best]
    met = b["avg"] <= 1.01 * ref_avg and b["tokens"] <= 0.6 * ref_tokens
    lines.append(f"target 1 (within 1% of joint at <= 60% compute): gap {b['avg'] / ref_avg - 1:+.2%}, compute "
                 f"{b['tokens'] / ref_tokens:.0%} -> {'MET' if met else 'NOT MET'}")
    if naive:
        for name, r in results.items():
            if name == "naive" or naive["forgetting"] is None or r["forgetting"] is None:
                continue
            cut = 1 - r["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
            newest_ok = r["newest"] <= 1.02 * naive["newest"]
            lines.append(f"  {name:>14}: forgetting cut {cut:+.0%} vs naive ({'MET' if cut >= 0.8 else 'not met'}),"
                         f" newest-domain loss {r['newest'] / naive['newest'] - 1:+.1%} vs naive "
                         f"({'MET' if newest_ok else 'not met'})")
    print("\n".join(lines))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"strategies": results, "joint": {"final": joint, "avg": ref_avg, "tokens": ref_tokens}}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
