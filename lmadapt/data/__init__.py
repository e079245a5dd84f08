"""Training data: sources, tokenization cache, packing and deterministic mixtures.

Every batch is a pure function of (seed, step): any process can build its own rows of any step.
"""


class DataError(ValueError):
    """A data problem, naming the source, file (and line) and what is wrong."""
