"""Continual-update methods: one module per method, each owning what the method needs.

    l2sp.py     L2-SP: (lambda / 2) ||theta - theta*||^2 toward the start version
    ewc.py      EWC: (lambda / 2) sum F (theta - theta*)^2 with the parent's Fisher; publishing a Fisher
    distill.py  LwF / distillation: + weight * T^2 * KL(teacher_T || model_T) per token
    lora.py     LoRA: adapters on a frozen base, merged before every forward pass
    replay.py   replay of the parent's data sources (the mixture itself is lmadapt.data.pipeline's)
    merge.py    weight-space merging of versions (WiSE-FT interpolation, model soups)
    fisher.py   the diagonal Fisher estimator and the penalty arithmetic

`method.py` is the interface (what a method may own: reference tensors, an objective term, a params layout,
a record entry, artifacts), `strategy.py` the registry (`METHODS`) and the run's `Strategy`, built once from
the config. A new method is a new module here, one line in `strategy.METHODS`, and its config keys in
`lmadapt/config/schema.py` (where every key is typed and documented).
"""
