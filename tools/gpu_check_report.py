"""The tables tools/gpu_check.py prints and writes to summary.md, from its results dict."""

from __future__ import annotations

from typing import Any

MFU_TARGET = 0.45  # llama-1b at seq 2048, bf16, one H100/H200 (issue 19)
TORCH_TARGET = 1.0  # lmadapt's tokens/s over the best torch variant's on the same GPU


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _gib(x: Any) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def env_lines(env: dict[str, Any]) -> list[str]:
    if not env:
        return []
    names = ("python", "jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers")
    lines = [f"- {env.get('gpu', 'gpu: ?')}", f"- {env.get('cpu', 'cpu: ?')}",
             f"- devices: {', '.join(env.get('devices', [])) or '?'}",
             "- versions: " + ", ".join(f"{n} {env.get(n, '?')}" for n in names)]
    if env.get("missing"):
        lines.append(f"- **missing**: {', '.join(env['missing'])}")
    if env.get("installed"):
        lines.append(f"- installed from .whl: {', '.join(env['installed'])}")
    return lines


def stage_lines(results: dict[str, Any]) -> list[str]:
    lines = ["| stage | ok | rc | wall s | note |", "|---|---|---|---|---|"]
    for stage in results["stages"]:
        r = results.get(stage, {})
        note = r.get("error") or r.get("summary") or ""
        lines.append(f"| {stage} | {'yes' if r.get('ok') else '**no**'} | {r.get('rc', '-')} "
                     f"| {_f(r.get('wall_s'), '.0f')} | {note} |")
    return lines


def train_lines(train: dict[str, Any]) -> list[str]:
    lines = ["| lmadapt variant | batch x seq | tokens/s | step ms | MFU (measured bf16 peak) | MFU (datasheet) "
             "| peak mem GiB | plan GiB | compile s | loss |", "|" + "---|" * 10]
    for r in train.get("rows", []):
        if r.get("rc") != 0 or "tokens_per_s" not in r:
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | failed (rc {r.get('rc')}): "
                         f"{r.get('error', '')} |")
            continue
        mfu = r["mfu"].get("bf16", r["mfu"].get("fp32"))
        plan = (r.get("plan") or {}).get("total")
        lines.append(f"| {r['variant']} | {r['batch']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} "
                     f"| {r['step_s']['median'] * 1e3:.1f} | {mfu:.1%} | {_f(r.get('mfu_datasheet'), '.1%')} "
                     f"| {_gib(r.get('memory_bytes'))} | {_gib(plan)} | {r['compile_s']:.1f} | {r['final_loss']:.3f} |")
    return lines


def torch_lines(torch: dict[str, Any]) -> list[str]:
    lines = ["| torch variant | batch x seq | tokens/s | step ms | MFU (measured bf16 peak) | MFU (datasheet) "
             "| peak mem GiB | 1st step s | loss | status |", "|" + "---|" * 10]
    for name, r in torch.get("variants", {}).items():
        lines.append(f"| {name} | {r.get('batch', '-')} | {_f(r.get('tokens_per_s'), ',.0f')} "
                     f"| {_f(r.get('median_ms'), '.1f')} | {_f(r.get('mfu_measured'), '.1%')} "
                     f"| {_f(r.get('mfu_datasheet'), '.1%')} | {_gib(r.get('peak_mem'))} "
                     f"| {_f(r.get('first_step_s'), '.1f')} | {_f(r.get('final_loss'), '.3f')} "
                     f"| {r.get('status', '?')}{': ' + r['note'] if r.get('note') else ''} |")
    if not torch.get("variants") and torch.get("error"):
        lines.append(f"| - | - | - | - | - | - | - | - | - | {torch['error']} |")
    return lines


def target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured number and met / missed."""
    rows = [r for r in results.get("train", {}).get("rows", []) if "tokens_per_s" in r]
    lines = []
    if rows:
        best = max(rows, key=lambda r: r["tokens_per_s"])
        mfu = best["mfu"].get("bf16", best["mfu"].get("fp32"))
        lines.append(f"- MFU >= {MFU_TARGET:.0%}: {mfu:.1%} ({best['variant']}; datasheet "
                     f"{_f(best.get('mfu_datasheet'), '.1%')}): {'met' if mfu >= MFU_TARGET else '**missed**'}")
        ran = [r for r in results.get("torch", {}).get("variants", {}).values() if r.get("tokens_per_s")]
        if ran:
            # Per token, so a torch variant that ran at half the batch (out of memory) still compares.
            ratio = best["tokens_per_s"] / max(r["tokens_per_s"] for r in ran)
            lines.append(f"- vs best torch >= {TORCH_TARGET:.1f}x tokens/s: {ratio:.2f}x: "
                         f"{'met' if ratio >= TORCH_TARGET else '**missed**'}")
    for stage in ("continual", "tests"):
        if stage in results:
            lines.append(f"- {stage} green: {'met' if results[stage].get('ok') else '**missed**'}")
    return lines


def top_op_lines(train: dict[str, Any], top: int = 12) -> list[str]:
    rows = train.get("rows", [])
    ops = rows[0].get("top_ops") if rows else None
    if not ops:
        return []
    lines = [f"Top ops of `{rows[0]['variant']}` (3 traced steps; share of op time):", "",
             "| share | ms | op | | share | ms | kind |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(ops["ops"][:top], ops["kinds"][:top] + [None] * top, strict=False):
        right = f"{b[2]:.1%} | {b[1]:.1f} | {b[0][:60]}" if b else " | | "
        lines.append(f"| {a[2]:.1%} | {a[1]:.1f} | {a[0][:60]} | | {right} |")
    return lines


def continual_lines(c: dict[str, Any]) -> list[str]:
    lines = ["| continual step | rc | wall s | note |", "|---|---|---|---|"]
    for s in c.get("steps", []):
        lines.append(f"| {s.get('name')} | {s.get('rc')} | {_f(s.get('wall_s'), '.0f')} | {s.get('note', '')} |")
    losses = c.get("losses") or {}
    domains = sorted({d for row in losses.values() for d in row})
    if domains:
        lines += ["", "| version | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for version, row in losses.items():
            lines.append(f"| {version} | " + " | ".join(_f(row.get(d), ".4f") for d in domains) + " |")
    return lines


def render(results: dict[str, Any]) -> str:
    """summary.md: the machine, each stage, the speed tables, the targets, the continual run, the tests."""
    title = "GPU check" + (" (--tiny dry run on CPU)" if results.get("tiny") else "")
    parts = [f"# {title}", "", *env_lines(results.get("env", {})), "", *stage_lines(results), ""]
    if "train" in results:
        parts += [*train_lines(results["train"]), ""]
    if "torch" in results:
        parts += [*torch_lines(results["torch"]), ""]
    if results.get("tiny"):
        parts += ["Targets (the dry run's sizes are not the targets'; this shows the script reads them):"]
    parts += [*target_lines(results), ""]
    if "train" in results:
        parts += [*top_op_lines(results["train"]), ""]
    if "continual" in results:
        parts += [*continual_lines(results["continual"]), ""]
    if "tests" in results:
        t = results["tests"]
        parts += [f"tests on the device ({' '.join(t.get('files', []))}): {t.get('summary', '')}", ""]
    parts.append(f"total wall time: {results.get('wall_s', 0):.0f} s")
    return "\n".join(parts) + "\n"
