"""The tables of tools/cl_bench.py: strategies against the joint retrains, over seeds (mean ± spread)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from benchinfo import cpu_line

from lmadapt.eval.classification import markdown_table

TARGET_GAP, TARGET_FORGET, TARGET_NEWEST = 1.02, 0.10, 1.02


def _ms(values: list[float], fmt: str = ".4f") -> str:
    """mean ± spread (half the range over seeds); one value alone."""
    v = np.asarray(values, float)
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(v.mean(), fmt)} ± {format((v.max() - v.min()) / 2, fmt)}"


def _strategy_row(name: str, results: dict[int, dict[str, Any]], refs: list[str]) -> tuple[dict, dict]:
    """The summary row of one strategy and its seed means (for the targets)."""
    seeds = list(results.values())
    mine = [r["strategies"][name] for r in seeds]
    naive = [r["strategies"].get("naive") for r in seeds]
    ratio = {m: [s["avg"] / r["joint"][m]["avg"] for s, r in zip(mine, seeds, strict=True)] for m in refs}
    row = {"strategy": name, "final_avg_loss": _ms([s["avg"] for s in mine]),
           **{f"vs_joint_{m}x": _ms(ratio[m], ".3f") for m in refs},
           "forgetting": _ms([s["forgetting"] for s in mine]), "bwt": _ms([s["bwt"] for s in mine]),
           "newest_loss": _ms([s["newest"] for s in mine]), "wall_s": _ms([s["wall_s"] for s in mine], ".0f")}
    means = {"gap": float(np.mean(ratio[refs[0]])), "forgetting": float(np.mean([s["forgetting"] for s in mine]))}
    if all(naive):
        f_ratio = [s["forgetting"] / max(n["forgetting"], 1e-9) for s, n in zip(mine, naive, strict=True)]
        n_ratio = [s["newest"] / n["newest"] for s, n in zip(mine, naive, strict=True)]
        row.update(forgetting_vs_naive=_ms(f_ratio, ".1%"), newest_vs_naive=_ms(n_ratio, ".3f"))
        means.update(forgetting_ratio=float(np.mean(f_ratio)), newest_ratio=float(np.mean(n_ratio)))
    return row, means


def summary_rows(results: dict[int, dict[str, Any]], refs: list[str]) -> tuple[list[dict], dict[str, dict]]:
    """One row per strategy (numbers over seeds), then the joint references; and the per-strategy means."""
    rows, means = [], {}
    for name in next(iter(results.values()))["strategies"]:
        row, means[name] = _strategy_row(name, results, refs)
        rows.append(row)
    seeds = list(results.values())
    for m in refs:
        rows.append({"strategy": f"joint {m}x (reference)",
                     "final_avg_loss": _ms([r["joint"][m]["avg"] for r in seeds]),
                     **{f"vs_joint_{m2}x": _ms([r["joint"][m]["avg"] / r["joint"][m2]["avg"] for r in seeds], ".3f")
                        for m2 in refs},
                     "wall_s": _ms([r["joint"][m]["wall_s"] for r in seeds], ".0f")})
    return rows, means


def domain_rows(results: dict[int, dict[str, Any]], domains: list[str], refs: list[str]) -> list[dict]:
    """Final loss per domain (mean over seeds) of every strategy and joint model."""
    rows = []
    first = next(iter(results.values()))
    for name in first["strategies"]:
        final = np.mean([r["strategies"][name]["final"] for r in results.values()], axis=0)
        rows.append({"model": name, **{d: f"{v:.4f}" for d, v in zip(domains, final, strict=True)}})
    for m in refs:
        final = np.mean([r["joint"][m]["final"] for r in results.values()], axis=0)
        rows.append({"model": f"joint {m}x", **{d: f"{v:.4f}" for d, v in zip(domains, final, strict=True)}})
    return rows


def r_tables(results: dict[int, dict[str, Any]], domains: list[str]) -> list[str]:
    """Each strategy's R (rows: the version after each stage; columns: held-out loss per domain), seed mean."""
    out = []
    for name in next(iter(results.values()))["strategies"]:
        R = np.mean([r["strategies"][name]["R"] for r in results.values()], axis=0)
        rows = [{"after": "base" if i == 0 else f"stage {i} ({domains[i]})",
                 **{d: f"{v:.4f}" for d, v in zip(domains, R[i], strict=True)}} for i in range(len(R))]
        out.append(f"R, {name}:\n\n" + markdown_table(rows, ["after", *domains]))
    return out


def cost_rows(results: dict[int, dict[str, Any]], domains: list[str], steps: int, ref: str) -> list[dict]:
    """What update k costs against retraining on everything seen so far ((k+1) stages of data, equal compute),
    in tokens and in wall time (the retrain's estimated from the equal-compute joint run's)."""
    first = next(iter(results.values()))
    name = list(first["strategies"])[-1]  # the last strategy listed (the default's: the recipe with a budget)
    joint_wall = np.mean([r["joint"][ref]["wall_s"] for r in results.values()])
    rows = []
    for k in range(1, len(domains)):
        wall = np.mean([r["strategies"][name]["stage_wall_s"][k - 1] for r in results.values()])
        retrain_wall = joint_wall * (k + 1) / len(domains)
        rows.append({"update": f"stage {k} ({domains[k]})", "update_tokens": steps * 2048,
                     "retrain_tokens": (k + 1) * steps * 2048, "token_ratio": f"{1 / (k + 1):.0%}",
                     "update_wall_s": f"{wall:.0f}", "retrain_wall_s (est.)": f"{retrain_wall:.0f}"})
    return rows


def targets(means: dict[str, dict]) -> list[str]:
    """The issue's three targets, checked on every strategy's seed means."""
    lines = []
    for name, m in means.items():
        if name == "naive" or "forgetting_ratio" not in m:
            continue
        ok = [m["gap"] <= TARGET_GAP, m["forgetting_ratio"] <= TARGET_FORGET, m["newest_ratio"] <= TARGET_NEWEST]
        lines.append(f"{name:>24}: gap {m['gap']:.3f}x ({'MET' if ok[0] else 'not met'}), forgetting "
                     f"{m['forgetting_ratio']:.1%} of naive ({'MET' if ok[1] else 'not met'}), newest "
                     f"{m['newest_ratio']:.3f}x naive ({'MET' if ok[2] else 'not met'})"
                     + ("  <- all targets met" if all(ok) else ""))
    return lines


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace, domains: list[str], wall: float) -> str:
    """The whole results text (markdown): settings, summary, per-domain, costs, targets, R matrices."""
    refs = [f"{float(x):g}" for x in args.refs.split(",")]
    rows, means = summary_rows(results, refs)
    cols = ["strategy", "final_avg_loss", *[f"vs_joint_{m}x" for m in refs], "forgetting", "forgetting_vs_naive",
            "newest_vs_naive", "bwt", "newest_loss", "wall_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    parts = [f"{cpu_line()}",
             f"sequence: {' -> '.join(domains)}; {args.steps} steps x {16} x {128} tokens per stage; seeds "
             f"{args.seeds} (mean ± half-range); total wall {wall / 60:.1f} min",
             markdown_table(rows, cols),
             "Final held-out loss per domain (seed mean):\n\n" + markdown_table(domain_rows(results, domains, refs),
                                                                                ["model", *domains]),
             f"Cost of each update ({list(next(iter(results.values()))['strategies'])[-1]}) against a retrain on "
             "everything seen so far (equal compute):\n\n"
             + markdown_table(cost_rows(results, domains, args.steps, refs[0]),
                              ["update", "update_tokens", "retrain_tokens", "token_ratio", "update_wall_s",
                               "retrain_wall_s (est.)"]),
             "Targets (gap <= 1.02x joint at equal compute, forgetting <= 10% of naive, newest <= 1.02x naive):\n"
             + "\n".join(targets(means)),
             *r_tables(results, domains)]
    return "\n\n".join(parts)
