"""The lineage of model versions: the store of immutable versions (`store`), their records (`records`), the
atomic publish (`publish`), their recorded metrics (`metrics`), and where a run starts from (`origin`).

    lineage = Lineage("runs/lineage"); lineage.ids(); lineage.record("base"); lineage.load_params("base")
"""

from lmadapt.lineage.store import Lineage, LineageError, params_hash

__all__ = ["Lineage", "LineageError", "params_hash"]
