"""Test setup: 8 fake CPU devices for sharding tests (must be set before JAX is imported).

LMADAPT_TEST_DEVICE=gpu (tools/gpu_check.py) runs the tests on the accelerator JAX finds instead. There, fp32
matmuls default to TF32-like precision, so the comparisons with transformers' fp32 logits would test that
rounding rather than the model: the run asks for full fp32 precision. A test marked `devices(n)` that needs
more devices than the accelerator has is skipped there, with the count in the reason; on CPU it always runs.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ON_DEVICE = os.environ.get("LMADAPT_TEST_DEVICE")
if ON_DEVICE:
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the test session and the train.py subprocesses it starts: the same tiny
# step compiled by many tests (and by both halves of the resume test) is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmadapt-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One token cache for the whole test session (tests never touch ~/.cache)."""
    return str(tmp_path_factory.mktemp("lmadapt-cache"))


@pytest.fixture
def tiny_config(data_cache):
    """The tiny run config with per-test overrides: `tiny_config("train.steps=3", "mesh.data=1")`. In float32:
    tests compare against float32 references on every machine (`auto` picks bf16 on some; tests/test_precision.py)."""
    from lmadapt.config import load_config

    def make(*overrides: str):
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                           [f"data.sources.0.path={os.path.join(ROOT, 'data', 'shakespeare.txt.xz')}",
                            f"data.cache_dir={data_cache}", "model.dtype=float32", *overrides])

    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n JAX devices (the suite's 8 fake CPU devices give them)")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("devices")
    if marker and ON_DEVICE:
        import jax

        if jax.device_count() < marker.args[0]:
            pytest.skip(f"needs {marker.args[0]} devices; this {ON_DEVICE} run has {jax.device_count()}")
