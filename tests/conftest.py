"""Test setup: 8 fake CPU devices for sharding tests (must be set before JAX is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One token cache for the whole test session (tests never touch ~/.cache)."""
    return str(tmp_path_factory.mktemp("lmadapt-cache"))


@pytest.fixture
def tiny_config(data_cache):
    """The tiny run config with per-test overrides: `tiny_config("train.steps=3", "mesh.data=1")`."""
    from lmadapt.config import load_config

    def make(*overrides: str):
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                           [f"data.sources.0.path={os.path.join(ROOT, 'data', 'shakespeare.txt.xz')}",
                            f"data.cache_dir={data_cache}", *overrides])

    return make

