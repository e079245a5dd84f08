"""Index functions that hold no state: which documents are held out, and the order of a source's rows each epoch.

Both are hashes of an index, so neither needs memory that grows with the corpus (a permutation array of
10M rows is 80 MB per epoch kept, a held-out split drawn as a permutation of the documents another 80 MB).

- A document is held out when the hash of (seed, source, its file's content key, its index in the file) falls
  below `data.val_fraction`, as tfds' split-by-hash does. The decision belongs to the document: a reader that
  holds a few of the files takes the same decisions as one that holds them all, and a file added to a source
  leaves every other file's held-out documents where they were (the forgetting a version measures on them
  stays comparable along the lineage). Identical files share their decisions, so a duplicate never lands on
  both sides of the split.
- The rows of an epoch are a keyed Feistel permutation of range(n), with cycle walking: any slot's row in
  O(1), as grain's IndexShuffle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmadapt.data import DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20  # documents hashed at a time


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps, as intended)."""
    x = np.atleast_1d(np.asarray(x, np.uint64)) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key64(*parts: Any) -> int:
    """A 64-bit key from JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """Element i of a pseudorandom permutation of range(n) chosen by `key` (a bijection for each key)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # a domain of 4**half >= n: at most 4 walks expected
    mask = np.uint64((1 << half) - 1)
    keys = mix64(np.arange(4, dtype=np.uint64) + np.uint64(key))
    x = np.asarray(i, np.uint64).copy()
    todo = np.ones(len(x), bool)
    while todo.any():  # cycle walking: re-permute what falls outside range(n) until it falls inside
        left, right = x[todo] >> np.uint64(half), x[todo] & mask
        for k in keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def unit_id(key: dict[str, Any]) -> int:
    """A file's identity in the held-out rule: its content key (size, sha256, reading rule)."""
    return key64(key)


class HeldOut:
    """The held-out documents of one source: document j of unit k is held out when its hash is below
    `val_fraction` of the range. A source with none held out (a handful of documents) holds out its lowest
    hash; one with all held out trains on its highest, so either split has at least one document."""

    def __init__(self, unit_ids: Sequence[int], unit_docs: Sequence[int], val_fraction: float, seed: int,
                 name: str):
        n = int(sum(unit_docs))
        if n < 2:
            raise DataError(f"source {name!r} has {n} document; a held-out split needs at least 2 (use "
                            f"documents: chars or blank_line to cut files into documents)")
        self.salt = key64("held-out", seed, name)
        self.unit_ids = list(unit_ids)
        self.threshold = np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
        self.force_val: tuple[int, int] | None = None
        self.force_train: tuple[int, int] | None = None
        count, low, high = 0, (2**64, None), (-1, None)
        for k, docs in enumerate(unit_docs):
            for lo in range(0, docs, _CHUNK):
                h = self._hash(k, lo, min(docs, lo + _CHUNK))
                count += int((h < self.threshold).sum())
                a, b = int(h.argmin()), int(h.argmax())
                if int(h[a]) < low[0]:
                    low = (int(h[a]), (k, lo + a))
                if int(h[b]) > high[0]:
                    high = (int(h[b]), (k, lo + b))
        if count == 0:
            self.force_val, count = low[1], 1
        elif count == n:
            self.force_train, count = high[1], n - 1
        self.n_val = count

    def _hash(self, k: int, lo: int, hi: int) -> np.ndarray:
        return mix64(mix64(np.arange(lo, hi, dtype=np.uint64) ^ np.uint64(self.unit_ids[k]))
                     ^ np.uint64(self.salt))

    def mask(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Held out or not, for documents lo..hi-1 of unit k."""
        out = self._hash(k, lo, hi) < self.threshold
        for forced, value in ((self.force_val, True), (self.force_train, False)):
            if forced is not None and forced[0] == k and lo <= forced[1] < hi:
                out[forced[1] - lo] = value
        return out

    def describe(self) -> list:
        """What, beyond the hashes, decides the split (part of a packing plan's key)."""
        return [self.force_val, self.force_train]
