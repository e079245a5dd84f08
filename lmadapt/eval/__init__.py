"""Evaluation of model versions: held-out scores (`scoring`), the cached report over a lineage (`report`),
continual-learning metrics (`metrics`), classification metrics and tables (`classification`), plots (`plots`);
the versions an eval covers (`targets`) and samples from a version (`samples`)."""
