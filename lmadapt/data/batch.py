"""The batch every step, evaluation and estimate consumes: one mapping of named [B, T] arrays.

    tokens       int32 [B, T]    input token ids (the pad id where a row is padding)
    targets      int32 [B, T]    the next token of each input (what the loss scores)
    positions    int32 [B, T]    position of each token within its document (restarting per packed document)
    segment_ids  int32 [B, T]    1, 2, ... per packed document; 0 marks padding (attention never crosses segments)
    loss_mask    float32 [B, T]  weight of each target in the loss (0: not scored, e.g. padding or a prompt)

The data pipeline builds it from numpy arrays on the host; jitted code receives the same keys as jax arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:  # the data pipeline runs without importing jax
    import jax

Batch = Mapping[str, Union[np.ndarray, "jax.Array"]]

# Every key of a batch, in the order above.
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
