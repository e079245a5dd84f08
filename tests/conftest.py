"""Test setup: 8 fake CPU devices for sharding tests (must be set before JAX is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
    """The tiny run config with per-test overrides: `tiny_config("train.steps=3", run_dir=...)`."""
    from lmadapt.config import load_config

    def make(*overrides: str):
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                           [f"data.path={os.path.join(ROOT, 'data', 'shakespeare.txt.xz')}", *overrides])

    return make

