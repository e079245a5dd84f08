"""Streaming safetensors: read one tensor (or one slice of it) at a time, write one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, and
"__metadata__": {str: str}}, then the raw little-endian bytes. Reads use plain positioned file reads, not a
memory map: pages of a mapped file count towards the process's resident memory until it is unmapped, so reading
a whole checkpoint through a map costs its size again on top of the converted arrays. Pickle is never read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from lmadapt.files.paths import file_problem, special_problem
from lmadapt.hf.common import INDEX_FILE, WEIGHTS_FILE, HFError, read_json

# The float dtypes weights may be stored in; integer and 8-bit float tensors are quantized weights.
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"),
                "F64": np.dtype("<f8")}
_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_CHUNK = 64 * 2**20  # bytes per read or write of a large tensor


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes are in its file."""

    path: str
    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and metadata of one safetensors file, every offset checked against the file's size."""
    bad = lambda why: HFError(f"{path}: not a readable safetensors file ({why})")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise bad(f"header length {n} is past the end of the {size}-byte file")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, HFError):
            raise
        raise bad(" ".join(str(e).split())) from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans, data = {}, [], 8 + n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in _ITEMSIZE and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r} has a malformed header entry")
        info = TensorInfo(path, name, dtype, shape, data + begin)
        if end - begin != info.nbytes or data + end > size:
            raise bad(f"tensor {name!r} needs bytes {begin}..{end} of a {size - data}-byte data section")
        tensors[name] = info
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    return tensors, metadata


def unsupported_dtype(info: TensorInfo) -> HFError:
    """The error for a tensor stored as integers or 8-bit floats (quantized weights)."""
    return HFError(f"{info.path}: tensor {info.name} has dtype {info.dtype}, which is not supported (expected "
                   f"{', '.join(FLOAT_DTYPES)}: quantized or integer weights cannot be loaded)")


def read_tensor(info: TensorInfo, index: tuple[slice, ...] = (), *, allow_nonfinite: bool = False) -> np.ndarray:
    """info's tensor, or the rectangular `index` (slices of step 1) of it, in its stored dtype.

    Reads the rows of axis 0 the index covers, a chunk at a time, so the bytes read beyond the result are at
    most one chunk; the result is a fresh array (no memory map behind it). NaN or Inf values are an HFError
    naming the file, tensor and count (unless `allow_nonfinite`): each chunk is checked as it arrives, so
    damaged weights cost no second pass and never reach training."""
    dtype = FLOAT_DTYPES.get(info.dtype)
    if dtype is None:
        raise unsupported_dtype(info)
    shape = info.shape
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
    if not shape:
        out = _pread(info.path, info.offset, dtype, 1).reshape(())
        bad = 0 if allow_nonfinite else int(not np.isfinite(out))
    else:
        (start, stop), rest = bounds[0], tuple(slice(a, b) for a, b in bounds[1:])
        row_items = math.prod(shape[1:])
        out = np.empty((max(stop - start, 0), *(b - a for a, b in bounds[1:])), dtype)
        step = max(1, _CHUNK // max(1, row_items * dtype.itemsize))
        bad = 0
        with open(info.path, "rb", buffering=0) as f:
            for r in range(start, stop, step):
                rows = min(step, stop - r)
                block = _pread(f, info.offset + r * row_items * dtype.itemsize, dtype, rows * row_items)
                part = block.reshape(rows, *shape[1:])[(slice(None), *rest)]
                out[r - start:r - start + rows] = part
                if not allow_nonfinite:
                    bad += part.size - int(np.count_nonzero(np.isfinite(part)))
    if bad:
        raise nonfinite_error(info, bad, out.size, bounds)
    return out


def nonfinite_error(info: TensorInfo, bad: int, size: int, bounds: list[tuple[int, int]] | None = None) -> HFError:
    """The error for a tensor holding NaN or Inf: `bad` of the `size` values read (`bounds`: the slice read)."""
    whole = bounds is None or all(b == (0, n) for b, n in zip(bounds, info.shape, strict=True))
    where = f"its {size} values" if whole else \
        f"the {size} values in its slice [{', '.join(f'{a}:{b}' for a, b in bounds)}]"
    return HFError(f"{info.path}: tensor {info.name}: {bad} of {where} are NaN or Inf; refusing to load damaged "
                   f"weights")


def _pread(f: Any, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    buf = np.empty(count, dtype)
    view = memoryview(buf.view(np.uint8))
    if isinstance(f, str):
        with open(f, "rb", buffering=0) as fh:
            return _pread(fh, offset, dtype, count)
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise HFError(f"{f.name}: ends inside a tensor (truncated file)")
        got += n
    return buf


# ---- A checkpoint directory: one file or an index of shards ----------------------------------------------------


def weight_files(directory: str) -> dict[str, TensorInfo]:
    """Every tensor of an HF directory (model.safetensors, or the shards model.safetensors.index.json names),
    headers only. Refused: pickle-only checkpoints, shard names with a path, missing shards, tensors missing from
    or not listed in the index, and a tensor stored twice."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    for path in (single, index):
        if (problem := special_problem(path)) is not None:  # never skipped for the other, nor opened (a pipe blocks)
            raise HFError(f"{path} {problem}")
    if os.path.isfile(single):
        return read_header(single)[0]
    if not os.path.isfile(index):
        names = os.listdir(directory) if os.path.isdir(directory) else []
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
            raise HFError(f"{directory}: only safetensors weights are accepted ({WEIGHTS_FILE} or {INDEX_FILE}); "
                          "pickle files (pytorch_model.bin) are never loaded. Re-save with "
                          "save_pretrained(..., safe_serialization=True)")
        raise HFError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFError(f"{index}: no 'weight_map' object of tensor name -> shard file")
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        # Shards must sit beside the index: a name like "../x" or "/etc/x" would read outside the checkpoint.
        if os.path.basename(shard) != shard or shard in ("", ".", "..") or "\\" in shard:
            raise HFError(f"{index}: shard name {shard!r} is not a plain file name")
        path = os.path.join(directory, shard)
        if (problem := file_problem(path)) is not None:
            why = f"is not a file in {directory}" if problem == "not found" else f"({path}) {problem}"
            raise HFError(f"{index}: shard {shard!r} {why}")
        for name, info in read_header(path)[0].items():
            if name in tensors:
                raise HFError(f"{index}: tensor {name} is stored twice, in {os.path.basename(tensors[name].path)} "
                              f"and {shard}")
            tensors[name] = info
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise HFError(f"{index}: tensor(s) {', '.join(missing[:5])} listed but not in any shard")
    for name, info in tensors.items():
        listed = weight_map.get(name)
        if listed != os.path.basename(info.path):
            where = f"listed in {listed!r}" if listed else "not listed in the index"
            raise HFError(f"{index}: tensor {name} is in {os.path.basename(info.path)} but {where}")
    return tensors


# ---- Writing -----------------------------------------------------------------------------------------------------


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a numpy dtype we write (float32 / bfloat16 / float16 / float64)."""
    return _CODES[np.dtype(dtype).name]


class StreamingWriter:
    """Writes one safetensors file whose tensors are given up front as (name, dtype code, shape) and whose bytes
    then arrive one tensor at a time, in that order. Holds no tensor: peak memory is one chunk of a tensor."""

    def __init__(self, path: str, specs: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path, self.specs, offset = path, list(specs), 0
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        for name, code, shape in self.specs:
            size = math.prod(shape) * _ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._next = 0
        self._file = open(path, "xb")  # noqa: SIM115  (closed in close(); "x": never over an existing file)
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, value: np.ndarray) -> None:
        """The next tensor's values (any layout; converted to the declared dtype a chunk of rows at a time)."""
        want, code, shape = self.specs[self._next]
        if name != want or tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.path}: got {name} {value.shape}, expected {want} {shape} next")
        dtype = FLOAT_DTYPES[code]
        rows = value.reshape(1, -1) if value.ndim == 0 else value
        step = max(1, _CHUNK // max(1, math.prod(shape[1:]) * dtype.itemsize))
        for r in range(0, len(rows), step):
            self._file.write(np.ascontiguousarray(rows[r:r + step], dtype=dtype).view(np.uint8).data)
        self._next += 1

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        """Flush to disk; on success every declared tensor must have been written (on an error the caller
        discards the file)."""
        try:
            if exc_type is None:
                if self._next != len(self.specs):
                    raise ValueError(f"{self.path}: {len(self.specs) - self._next} declared tensors not written")
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()


def plan_shards(specs: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of `specs` per shard file, in order: a new file starts when the next tensor would take the current
    one over `max_shard_bytes` (a tensor bigger than that gets a file of its own), as save_pretrained does."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, code, shape) in enumerate(specs):
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of `count` shards: model.safetensors alone, else model-0000i-of-0000N.safetensors."""
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(specs: list[tuple[str, str, tuple[int, ...]]], shards: list[list[int]]) -> dict[str, Any]:
    """model.safetensors.index.json for a sharded export."""
    names = shard_names(len(shards))
    total = sum(math.prod(shape) * _ITEMSIZE[code] for _, code, shape in specs)
    return {"metadata": {"total_size": total},
            "weight_map": {specs[i][0]: names[s] for s, idx in enumerate(shards) for i in idx}}
