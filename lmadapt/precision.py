"""The compute dtype `model.dtype: auto` stands for, decided once per process from the devices and the CPU.

bfloat16 compute (float32 params, float32 accumulation in every dot) on GPUs and TPUs, and on CPUs with
BF16 units (AVX512-BF16 or AMX-BF16) when jax is 0.11 or newer: there XLA's CPU backend runs bf16 dots on
those units (YNNPACK). jax 0.10's CPU backend upcasts bf16 dots to float32, so bf16 there only adds casts
(measured: 1,018 against 1,028 tokens/s on a Xeon with AMX), and `auto` stays float32. Everywhere else
float32.
"""

from __future__ import annotations

import functools
import re

import jax

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FAST_BF16_JAX = (0, 11)  # the first jax whose CPU backend reaches the BF16 units


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, re.M)
    return set(found.group(1).split()) if found else set()


def choose(platform: str, flags: set[str], jax_version: tuple[int, ...]) -> tuple[str, str]:
    """(dtype, why) for `auto` on a backend `platform` ("cpu", "gpu", "tpu"), CPU `flags` and jax version."""
    if platform != "cpu":
        return "bfloat16", f"{platform}: bfloat16 compute"
    units = [f for f in BF16_FLAGS if f in flags]
    if not units:
        return "float32", "cpu without BF16 units (no avx512_bf16, amx_bf16): float32"
    version = ".".join(map(str, jax_version))
    if jax_version < FAST_BF16_JAX:
        return "float32", (f"cpu with {', '.join(units)}, but jax {version} runs bf16 dots in float32 on CPU "
                           f"(jax >= 0.11 uses the BF16 units): float32")
    return "bfloat16", f"cpu with {', '.join(units)}, jax {version}: bfloat16 compute"


def jax_version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:3])


@functools.cache
def auto() -> tuple[str, str]:
    """What `auto` is in this process, and why (the default backend's platform decides)."""
    return choose(jax.default_backend(), cpu_flags(), jax_version())


def compute_dtype(name: str) -> str:
    """A model's compute dtype by name: `auto` resolved, any other name as it is."""
    return auto()[0] if name == "auto" else name


def describe(name: str) -> str:
    """The start-up line's account of a model.dtype setting."""
    return f"{auto()[0]} (model.dtype=auto; {auto()[1]})" if name == "auto" else f"{name} (model.dtype={name})"
