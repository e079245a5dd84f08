"""SIGTERM/SIGINT as a flag the training loop reads between steps, so a preempted job saves and exits 0.

Imports nothing heavy: `train.py` raises the flag before it imports JAX, so a job preempted while it is
still starting (importing, reading data, compiling) also ends cleanly instead of dying with 143.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGINT while entered (main thread only); `signal` holds the first one received."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def agreed(self, sync_point: bool) -> bool:
        """Whether to stop now. With several processes all must stop at the same step, so they only
        compare flags at sync points (the logging steps); a single process stops at the next step."""
        import jax

        if jax.process_count() == 1:
            return self.signal is not None
        if not sync_point:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.signal is not None))))
