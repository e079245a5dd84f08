"""What every benchmark prints first: the CPU (model and bf16 units) and the accelerator, so a table read
later says which machine made it (the CI-class machines differ: AMD Zen 3 without BF16 units, Zen 5 and
Intel Xeon with AVX512-BF16 / AMX-BF16)."""

from __future__ import annotations

import os
import platform
import re
import subprocess

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_line() -> str:
    """lscpu's model name and which bf16 instruction flags the CPU has (from /proc/cpuinfo without lscpu)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    model, flags = fields.get("model name"), fields.get("flags")
    if model is None or flags is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                info = f.read()
        except OSError:
            info = ""
        model = model or next(iter(re.findall(r"^model name\s*:\s*(.*)$", info, re.M)), platform.processor() or "?")
        flags = flags or next(iter(re.findall(r"^flags\s*:\s*(.*)$", info, re.M)), "")
    have = set(flags.split())
    return (f"cpu: {model} ({os.cpu_count()} logical cpus); bf16 flags: "
            + ", ".join(f"{f}={'yes' if f in have else 'no'}" for f in BF16_FLAGS))


def gpu_line() -> str | None:
    """nvidia-smi's name, memory and driver of each GPU, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [r.strip() for r in out.stdout.splitlines() if r.strip()]
    return ("gpu: " + "; ".join(rows)) if out.returncode == 0 and rows else None
