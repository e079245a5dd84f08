"""Evaluation of model versions: held-out scores (`scoring`), the cached report over a lineage (`report`),
continual-learning and classification metrics (`metrics`) and plots (`plots`)."""
