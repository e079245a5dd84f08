"""Helpers shared by tests that run the entry points as a user would."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cmd(args: list[str], env: dict | None = None, timeout: float = 300):
    """Run a Python entry point of this repo in a subprocess with the test environment."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
