"""A 1-D array made of parts, each a `.npy` file memory-mapped on first use: a source's tokens, one part a file.

A process opens only the parts it slices, so one that builds a few rows of a large corpus touches a few files
(`opened` lists them, in order). Slices within one part are views; nothing here ever spans two parts, since a
document, and so every piece cut from it, lies in one file.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np


class ShardedArray:
    """The concatenation of `parts` (.npy paths, arrays, or None for a part all `fill`), read lazily."""

    def __init__(self, parts: list[str | np.ndarray | None], lengths: list[int], dtype: Any, fill: int = 0):
        self._parts: list[Any] = list(parts)
        self.bases = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)
        self.dtype, self.fill = np.dtype(dtype), fill
        self.opened: list[str] = []

    def __len__(self) -> int:
        return int(self.bases[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def part(self, k: int) -> np.ndarray:
        """Part k as an array (its file memory-mapped the first time it is asked for)."""
        p = self._parts[k]
        if p is None:
            return np.full(int(self.bases[k + 1] - self.bases[k]), self.fill, self.dtype)
        if isinstance(p, str):
            self.opened.append(p)
            # A plain view of the memory map: slicing an np.memmap costs several times more (measured in
            # PackedRows.rows, one slice a piece).
            p = self._parts[k] = np.asarray(np.load(p, mmap_mode="r", allow_pickle=False))
        return p

    def subset(self, parts: list[int]) -> ShardedArray:
        """Parts `parts` (indices, in order) as an array of their own."""
        lengths = [int(self.bases[k + 1] - self.bases[k]) for k in parts]
        return ShardedArray([self._parts[k] for k in parts], lengths, self.dtype, self.fill)

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("a ShardedArray is sliced with [start:stop]")
        start, stop, _ = s.indices(len(self))
        if stop <= start:
            return np.zeros(0, self.dtype)
        k = int(np.searchsorted(self.bases, start, side="right")) - 1
        base, end = int(self.bases[k]), int(self.bases[k + 1])
        if stop > end:
            raise IndexError(f"slice [{start}:{stop}] spans parts {k} and {k + 1} (at {end})")
        return self.part(k)[start - base:stop - base]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.concatenate([self.part(k) for k in range(len(self._parts))]) if self._parts \
            else np.zeros(0, self.dtype)
        return out.astype(dtype) if dtype is not None else out

    def range_sums(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """sum(self[a:b]) for each (a, b), reading only the parts the ranges fall in."""
        out = np.zeros(len(starts), np.int64)
        parts = np.searchsorted(self.bases, starts, side="right") - 1
        for k in np.unique(parts).tolist():
            sel = parts == k
            cum = np.concatenate([[0], np.cumsum(self.part(k), dtype=np.int64)])
            base = self.bases[k]
            out[sel] = cum[stops[sel] - base] - cum[starts[sel] - base]
        return out


def range_sums(a: np.ndarray | ShardedArray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """sum(a[s:e]) for each range, for a plain array or a ShardedArray (ranges within one part)."""
    if isinstance(a, ShardedArray):
        return a.range_sums(np.asarray(starts, np.int64), np.asarray(stops, np.int64))
    cum = np.concatenate([[0], np.cumsum(a, dtype=np.int64)])
    return cum[stops] - cum[starts]


class Column:
    """A 1-D array appended in pieces: in memory (`path` None), or a .npy file whose fixed-size header is written
    last, read back memory-mapped."""

    HEADER = 128  # bytes: magic, version, length and the padded dict of any 1-D shape

    def __init__(self, path: str | None, dtype: Any):
        self.path, self.dtype, self.n, self.parts = path, np.dtype(dtype), 0, []
        self.file = open(path, "wb") if path else None  # noqa: SIM115 - closed in close()
        if self.file:
            self.file.write(b"\0" * self.HEADER)

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self.dtype)
        if self.file:
            self.file.write(a.tobytes())
        else:
            self.parts.append(a)
        self.n += a.size

    def close(self) -> np.ndarray:
        if not self.file:
            return np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        meta = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)}
        text = repr(meta).ljust(self.HEADER - 10 - 1) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1"))
        self.file.close()
        return np.load(self.path, mmap_mode="r", allow_pickle=False)
