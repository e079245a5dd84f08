"""model.dtype=auto: bfloat16 compute where it is fast (GPU/TPU, a CPU with BF16 units under jax >= 0.11), float32
elsewhere, decided from the CPU's flags (mocked here) and said at start-up."""

import pytest

from lmadapt import precision

CPUINFO = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra} rdpid\n"
    "\nprocessor\t: 1\n")


@pytest.mark.parametrize(("platform", "extra", "version", "want"), [
    ("cpu", "avx512_bf16", (0, 12, 0), "bfloat16"),
    ("cpu", "amx_bf16 amx_tile", (0, 11, 2), "bfloat16"),
    ("cpu", "avx512_bf16", (0, 10, 2), "float32"),  # jax 0.10 upcasts bf16 dots on CPU: no gain
    ("cpu", "avx512_vnni", (0, 12, 0), "float32"),  # Zen 3 and older Xeons: no BF16 units
    ("gpu", "", (0, 10, 2), "bfloat16"),
    ("tpu", "", (0, 12, 0), "bfloat16"),
])
def test_auto_picks_bf16_only_where_it_is_fast(platform, extra, version, want):
    flags = precision.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx512f" in flags and ("avx512_bf16" in flags) == ("avx512_bf16" in extra)
    dtype, why = precision.choose(platform, flags, version)
    assert dtype == want
    if platform == "cpu" and version < (0, 11) and extra:
        assert "jax 0.10.2" in why and "jax >= 0.11" in why


def test_explicit_dtypes_pass_through_and_auto_is_described():
    assert precision.compute_dtype("float32") == "float32" and precision.compute_dtype("bfloat16") == "bfloat16"
    assert precision.compute_dtype("auto") in ("float32", "bfloat16")
    line = precision.describe("auto")
    assert line.startswith(precision.compute_dtype("auto")) and "model.dtype=auto" in line
    assert precision.cpu_flags("no flags here") == set()
