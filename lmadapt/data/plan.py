"""A source's packing plan: its training and held-out rows, planned a window of documents at a time.

Documents are taken `data.shuffle_window` at a time in file order; each window's training pieces are shuffled
and packed on their own (full pieces first, then next-fit), its held-out pieces packed in order. So planning
holds one window's arrays, never the source's (about 80 bytes a document done whole), and a window packs as
tightly as the whole source would (one partly filled row per window at most). The rows of every epoch are
then drawn across all windows by a permutation of the source's rows (`shuffle.permute`), so the order of
training is as random as with one window: the window bounds only which documents may share a row.

With a cache dir the plan is stored beside the token shards (`plans/<key>/`, one .npy per column, written aside
and renamed) and memory-mapped back, so a later run reads only the rows it draws; its key is every shard it is
made of and every setting that changes it. Without one (a small local corpus) it is planned into memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from lmadapt.data.packing import PackedRows, PackStats, arrange, make_pieces
from lmadapt.data.shards import Column, range_sums
from lmadapt.data.shuffle import HeldOut
from lmadapt.data.token_cache import TokenizedSource, staging, sweep, unlock_name
from lmadapt.data.written import Written

PLAN_FORMAT = 1
_COLUMNS = ("piece_start", "piece_len", "row_offsets", "row_loss")
_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """What decides a source's rows besides its tokens and held-out split."""

    seq_len: int
    pad_id: int
    long_docs: str
    window: int  # documents planned together (data.shuffle_window)
    seed: int
    name: str
    salt: str = ""  # data.readers: each reader shuffles its own way


def plan_source(tokenized: TokenizedSource, held: HeldOut, spec: PlanSpec, cache_dir: str | None,
                written: Written) -> tuple[PackedRows, PackedRows]:
    """(training rows, held-out rows) of `tokenized`: from the cache, else planned (and stored there)."""
    if not cache_dir or not tokenized.entries:
        columns, meta = _plan(tokenized, held, spec, None)
        return tuple(_rows(tokenized, spec, columns[s], meta[s]) for s in _SPLITS)  # type: ignore[return-value]
    root = os.path.join(os.path.expanduser(cache_dir), "plans")
    entry = os.path.join(root, _key(tokenized, held, spec))
    if (found := _load(entry, tokenized, spec)) is not None:
        return found
    written.folders(root)
    sweep(root)
    with staging(root) as tmp:
        columns, meta = _plan(tokenized, held, spec, tmp)
        del columns  # the memory maps, before the rename
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"format": PLAN_FORMAT, **meta}, f)  # written last: its presence marks a complete plan
        if os.path.isdir(entry) and _load(entry, tokenized, spec) is None:
            shutil.rmtree(entry, ignore_errors=True)  # a damaged plan: replaced
        unlock_name(tmp)
        try:
            os.rename(tmp, entry)
            written.add(entry)
        except OSError:  # another process stored the same plan first
            pass
    if (found := _load(entry, tokenized, spec)) is None:
        raise OSError(f"packing plan {entry} is unreadable after writing it")
    return found


def _key(tokenized: TokenizedSource, held: HeldOut, spec: PlanSpec) -> str:
    blob = {"format": PLAN_FORMAT, "shards": [os.path.basename(e) for e in tokenized.entries or ()],
            "held_out": [held.salt, int(held.threshold), held.describe()], "spec": dataclasses.asdict(spec)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:40]


def _windows(tokenized: TokenizedSource, window: int) -> Iterator[list[tuple[int, int, int]]]:
    """Each window's documents as (unit, first, end) runs, `window` documents a window, in file order."""
    segments, size = [], 0
    for p, docs in enumerate(tokenized.unit_docs):
        lo = 0
        while lo < docs:
            hi = min(docs, lo + window - size)
            segments.append((p, lo, hi))
            size += hi - lo
            lo = hi
            if size == window:
                yield segments
                segments, size = [], 0
    if segments:
        yield segments


def _plan(tokenized: TokenizedSource, held: HeldOut, spec: PlanSpec,
          directory: str | None) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
    """Plan every window into columns (files in `directory`, else memory); (columns, meta) per split."""
    sinks = {s: {c: Column(directory and os.path.join(directory, f"{s}_{c}.npy"), np.int64) for c in _COLUMNS}
             for s in _SPLITS}
    meta = {s: {"pieces": 0, "loss_total": 0, "stats": PackStats()} for s in _SPLITS}
    for s in _SPLITS:
        sinks[s]["row_offsets"].append(np.zeros(1, np.int64))
    mix = zlib.crc32((spec.name + spec.salt).encode())
    for w, segments in enumerate(_windows(tokenized, spec.window)):
        bounds = [tokenized.bounds(p, lo, hi) for p, lo, hi in segments]
        starts, ends = np.concatenate([b[0] for b in bounds]), np.concatenate([b[1] for b in bounds])
        assert tokenized.unit_index is not None
        is_val = np.concatenate([held.mask(tokenized.unit_index[p], lo, hi) for p, lo, hi in segments])
        for s, sel, seed in (("train", ~is_val, [spec.seed, mix, w]), ("val", is_val, None)):
            piece_start, piece_len, stats = make_pieces(starts[sel], ends[sel], spec.seq_len, spec.long_docs)
            piece_start, piece_len, offsets = arrange(piece_start, piece_len, spec.seq_len, seed)
            per_piece = piece_len if tokenized.weights is None else \
                range_sums(tokenized.weights, piece_start + 1, piece_start + piece_len + 1)
            cum = np.concatenate([[0], np.cumsum(per_piece, dtype=np.int64)])
            row_loss = cum[offsets[1:]] - cum[offsets[:-1]]
            m = meta[s]
            for c, a in zip(_COLUMNS, (piece_start, piece_len, offsets[1:] + m["pieces"], row_loss), strict=True):
                sinks[s][c].append(a)
            m["pieces"] += len(piece_start)
            m["loss_total"] += int(row_loss.sum())
            for f in dataclasses.fields(PackStats):
                setattr(m["stats"], f.name, getattr(m["stats"], f.name) + getattr(stats, f.name))
    columns = {s: {c: sinks[s][c].close() for c in _COLUMNS} for s in _SPLITS}
    for s in _SPLITS:
        meta[s].update(rows=len(columns[s]["row_loss"]), stats=dataclasses.asdict(meta[s]["stats"]))
    return columns, meta


def _rows(tokenized: TokenizedSource, spec: PlanSpec, columns: dict[str, np.ndarray],
          meta: dict[str, Any]) -> PackedRows:
    return PackedRows(tokenized.tokens, tokenized.weights, columns["piece_start"], columns["piece_len"],
                      columns["row_offsets"], spec.seq_len, spec.pad_id, PackStats(**meta["stats"]),
                      loss_tokens=columns["row_loss"], loss_total=int(meta["loss_total"]))


def _load(entry: str, tokenized: TokenizedSource, spec: PlanSpec) -> tuple[PackedRows, PackedRows] | None:
    """A stored plan, memory-mapped; None when it is missing or damaged (it is then planned again)."""
    try:
        with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        out = []
        for s in _SPLITS:
            cols = {c: np.asarray(np.load(os.path.join(entry, f"{s}_{c}.npy"), mmap_mode="r", allow_pickle=False))
                    for c in _COLUMNS}
            m = meta[s]
            ok = (len(cols["piece_start"]) == len(cols["piece_len"]) == m["pieces"]
                  and len(cols["row_loss"]) == m["rows"] == len(cols["row_offsets"]) - 1
                  and int(cols["row_offsets"][-1]) == m["pieces"])
            if not ok or meta.get("format") != PLAN_FORMAT:
                return None
            out.append(_rows(tokenized, spec, cols, m))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out[0], out[1]
