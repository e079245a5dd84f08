"""Results kept in the lineage beside each version (its metrics file), written by the evaluators that make them."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lmadapt.lineage import metrics as lineage_metrics
from lmadapt.lineage.store import Lineage, LineageError


class ResultCache:
    """Stores results in the lineage. A lineage that cannot be written (read-only, full, not ours) is said once
    and not tried again; a damaged metrics file is left alone (its version is not cached; `Lineage.metrics`
    warned about it when it was read)."""

    def __init__(self, lineage: Lineage, warn: Callable[[str], None], enabled: bool) -> None:
        self.lineage, self.warn, self.enabled = lineage, warn, enabled
        self.skipped: set[str] = set()

    def add(self, version: str, key: str, values: dict[str, Any]) -> None:
        if not self.enabled or version in self.skipped:
            return
        why = lineage_metrics.unwritable(os.path.dirname(self.lineage.metrics_path(version)))
        try:
            if why:
                raise LineageError(why)
            lineage_metrics.read_entries(self.lineage.metrics_path(version))
        except LineageError as e:
            if why:
                self.warn(f"results not cached in lineage {self.lineage.directory}: {e}; they are in the report "
                          f"only")
                self.enabled = False
            else:  # lineage.metrics has said so, in one line
                self.skipped.add(version)
            return
        try:
            self.lineage.add_metrics(version, key, values)
        except LineageError as e:  # the write itself failed (a full disk): nothing half-written is left
            self.warn(f"results not cached in lineage {self.lineage.directory}: {e}; they are in the report only")
            self.enabled = False
