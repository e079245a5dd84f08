"""Metric sinks for a run: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


class MetricsLogger:
    """Appends metrics to `<dir>/metrics.jsonl` and, optionally, TensorBoard event files under `<dir>/tb`.

    Only the process that owns it writes (the trainer creates one on process 0).
    """

    def __init__(self, directory: str, tensorboard: bool = True, warn: Callable[[str], None] = print):
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            # Images built for accelerators often lack tensorboardX (the NVIDIA one here does): the run goes
            # on with metrics.jsonl, which holds every number the event files would.
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warn("warning: logging.tensorboard: tensorboardX is not installed, so only metrics.jsonl is "
                     "written (pip install tensorboardX, or set logging.tensorboard=false)")
                return
            self._tb = SummaryWriter(os.path.join(directory, "tb"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Record scalar metrics for `step` under `prefix` (e.g. train, eval)."""
        row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """All rows of a run's `metrics.jsonl`, in order."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
