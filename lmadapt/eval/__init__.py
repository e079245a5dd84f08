"""Evaluation of model versions: held-out scores (`scoring`), the cached report over a lineage (`report`, with
`cache` keeping results in the lineage), continual-learning metrics (`metrics`), classification metrics and tables
(`classification`), plots (`plots`), the versions an eval covers (`targets`) and samples from a version
(`samples`). Capability tasks: task files and few-shot prompts (`tasks`), packed log-likelihoods (`loglik`),
multiple-choice and generation scores (`task_scoring`), and the version x task matrix (`task_report`)."""
