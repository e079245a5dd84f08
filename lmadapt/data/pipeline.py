"""The input pipeline: sources -> tokens (cached) -> packed rows -> a deterministic weighted mixture.

Every global batch is a pure function of (seed, step, phases). Slot g = step * batch_size + i of the
global batch stream is given to a source by a closed-form low-discrepancy rule, which also says how many
earlier slots that source has served; that count indexes the source's rows, reshuffled every epoch.
So a resumed run, or a run on any number of processes (each building only its own rows), sees exactly
the batches of an uninterrupted single-process run, and each source's share of every batch is its
weight to within one row.

The mixture may change at given steps: `phases` is a sorted list of (first step, replay fraction), each a
constant mixture whose slots are counted from its first step. A source's draws before a phase are the sum,
in closed form, of its draws in the phases before, so its rows are still drawn once per epoch and nothing
depends on history beyond the phases list ([(0, f)]: the single mixture of fraction f).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from lmadapt.config import DataConfig, TokenizerConfig
from lmadapt.data import DataError
from lmadapt.data.batch import Batch
from lmadapt.data.corpus_files import DigestMemo
from lmadapt.data.mixture import Phase, Plan, assign_slots, mixture_weight, replay_schedule
from lmadapt.data.packing import PackedRows
from lmadapt.data.plan import PlanSpec, plan_source
from lmadapt.data.shuffle import HeldOut, key64, permute, unit_id
from lmadapt.data.sources import SourceRead, read_source
from lmadapt.data.token_cache import TokenizedSource, tokenize_source
from lmadapt.data.tokenize_workers import WorkerError
from lmadapt.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_hf_tokenizer,
    load_tokenizer,
    train_bpe,
    train_sentencepiece,
)
from lmadapt.data.written import Written


@dataclasses.dataclass
class Component:
    """One source in the training mixture."""

    name: str
    rows: PackedRows
    weight: float  # normalised: the components' weights sum to 1 (in the first phase)
    replay: bool
    source_weight: float = 1.0  # the configured weight, relative to its group's (training or replay) sources
    _seed: int = 0
    salt: str = ""  # data.readers: each reader draws its rows in its own order

    def __post_init__(self) -> None:
        self.loss_tokens = self.rows.row_loss_tokens()

    def epoch_key(self, epoch: int) -> int:
        return key64("rows", self._seed, self.name + self.salt, epoch)

    def row_of(self, j: np.ndarray) -> np.ndarray:
        """Row index of this component's j-th draw: epoch j // n_rows, its rows in a fresh order each epoch."""
        n = self.rows.n_rows
        epochs, within = np.divmod(np.asarray(j, np.int64), n)
        out = np.empty_like(within)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = permute(within[sel], n, self.epoch_key(e))
        return out

    def loss_tokens_drawn(self, draws: int) -> int:
        """Loss-carrying tokens of this component's first `draws` draws (a partial epoch summed in blocks)."""
        n = self.rows.n_rows
        full, part = divmod(draws, n)
        total = full * (self.rows.loss_total if self.rows.loss_total is not None else int(self.loss_tokens.sum()))
        key = self.epoch_key(full)
        for lo in range(0, part, 1 << 20):
            total += int(self.loss_tokens[permute(np.arange(lo, min(part, lo + (1 << 20))), n, key)].sum())
        return total


class DataPipeline:
    """Training batches, held-out batches per source, and accounting of what was trained on."""

    def __init__(self, components: list[Component], val: dict[str, PackedRows], tokenizer: Tokenizer,
                 batch_size: int, seq_len: int, seed: int, sources: dict[str, dict[str, Any]],
                 phases: list[Phase] | None = None, shuffle_window: int | None = None):
        self.components, self.val, self.tokenizer = components, val, tokenizer
        self.shuffle_window = shuffle_window
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.sources = sources  # name -> fingerprint, weights and packing stats (for the version record)
        rng = np.random.default_rng([seed, 7919])
        self._offsets = rng.random(len(components)).tolist()
        self._weights = [c.weight for c in components]
        if phases is None:  # the components' own weights, as one phase
            fraction = float(sum(c.weight for c in components if c.replay))
            self._plans = (self._plan(0, fraction, self._weights, np.zeros(len(components), np.int64)),)
        else:
            self.set_phases(phases)

    @property
    def phases(self) -> list[Phase]:
        """The mixture's phases: (first step, replay fraction), sorted."""
        return [(p.start, p.fraction) for p in self._plans]

    def set_phases(self, phases: list[Phase]) -> None:
        """Change the mixture to `phases` (the first starts at step 0; starts increase; fractions in [0, 1))."""
        phases = [(int(s), float(f)) for s, f in phases]
        starts = [s for s, _ in phases]
        if not phases or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"mixture phases {phases}: the first must start at step 0 and the starts increase")
        has_replay = any(c.replay for c in self.components)
        for _, f in phases:
            if not 0 <= f < 1 or (f > 0 and not has_replay):
                raise ValueError(f"mixture phases {phases}: replay fraction {f} is not in [0, 1)"
                                 + ("" if has_replay else " with no replay sources (only 0 is)"))
        totals = {g: sum(c.source_weight for c in self.components if c.replay == g) for g in (False, True)}
        plans, base = [], np.zeros(len(self.components), np.int64)
        for i, (start, f) in enumerate(phases):
            weights = [mixture_weight(f, c.replay, has_replay, c.source_weight, totals[c.replay])
                       for c in self.components]
            plans.append(self._plan(start, f, weights, base))
            if i + 1 < len(phases):
                base = base + plans[-1].draws((phases[i + 1][0] - start) * self.batch_size, len(self.components))
        self._plans = tuple(plans)  # one assignment: a batch built meanwhile sees the old phases or the new

    def with_phases(self, phases: list[Phase]) -> DataPipeline:
        """A pipeline over the same rows with the mixture `phases`."""
        other = copy.copy(self)
        other.set_phases(phases)
        return other

    def _plan(self, start: int, fraction: float, weights: list[float], base: np.ndarray) -> Plan:
        active = np.array([k for k, w in enumerate(weights) if w > 0], np.int64)
        return Plan(start, fraction, active, [weights[k] for k in active], [self._offsets[k] for k in active],
                     base.copy())

    def draws(self, step: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(component, draw index within the component) of rows `rows` of the batch of `step`."""
        rows = rows or slice(0, self.batch_size)
        plans = self._plans
        plan = plans[bisect.bisect_right([p.start for p in plans], step) - 1]
        slots = (step - plan.start) * self.batch_size + np.arange(rows.start, rows.stop)
        local, index = assign_slots(slots, plan.weights, plan.offsets)
        comp = plan.active[local]
        return comp, index + plan.base[comp]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch(self, step: int, rows: slice | None = None) -> Batch:
        """Rows `rows` (default: all) of the global training batch for `step`."""
        comp, index = self.draws(step, rows)
        out: Batch | None = None
        for k in np.unique(comp).tolist():
            sel = comp == k
            c = self.components[k]
            part = c.rows.rows(c.row_of(index[sel]))
            if out is None:
                out = {key: np.empty((len(comp), *v.shape[1:]), v.dtype) for key, v in part.items()}
            for key, v in part.items():
                out[key][sel] = v
        assert out is not None
        return out

    def source_counts(self, step: int) -> dict[str, int]:
        """Rows each source contributes to the global batch of `step` (what the mixture test checks)."""
        comp, _ = self.draws(step)
        return {c.name: int((comp == k).sum()) for k, c in enumerate(self.components)}

    def tokens_seen(self, steps: int) -> dict[str, int]:
        """Loss-carrying tokens each source supplied in the first `steps` steps (exact, no state)."""
        if steps <= 0:
            return {c.name: 0 for c in self.components}
        plans = self._plans
        plan = plans[bisect.bisect_right([p.start for p in plans], steps - 1) - 1]
        # Draws before the first slot of `steps`: the earlier phases' (closed form), then this phase's.
        draws = plan.base + plan.draws((steps - plan.start) * self.batch_size, len(self.components))
        return {c.name: c.loss_tokens_drawn(n) for c, n in zip(self.components, draws.tolist(), strict=True)}

    def val_batches(self, name: str, limit: int) -> int:
        """How many held-out batches source `name` has (at most `limit`); the last may be partly empty."""
        return min(limit, -(-self.val[name].n_rows // self.batch_size))

    def val_batch(self, name: str, i: int, rows: slice | None = None) -> Batch:
        """Rows `rows` of held-out batch `i` of source `name` (rows past the end are empty)."""
        rows = rows or slice(0, self.batch_size)
        idx = i * self.batch_size + np.arange(rows.start, rows.stop)
        idx[idx >= self.val[name].n_rows] = -1
        return self.val[name].rows(idx)

    def describe(self) -> dict[str, Any]:
        """What this pipeline trains on: sources with fingerprints, weights (of the first phase) and stats;
        tokenizer; the mixture's phases as [first step, replay fraction] (data.replay.final_fraction's
        schedule, a forgetting budget's changes)."""
        return {"tokenizer": self.tokenizer.fingerprint, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle_window": self.shuffle_window, "held_out": HELD_OUT_RULE, "sources": self.sources,
                "replay_phases": [[s, f] for s, f in self.phases]}


def held_out_split(read: SourceRead, val_fraction: float, seed: int, name: str) -> tuple[list, list]:
    """(training documents, held-out documents) of a source read whole, as training splits it (for the tools
    and scores that work on documents rather than rows)."""
    units = [list(u.read()) for u in read.units]
    held = HeldOut([unit_id(u.key) for u in read.units], [len(d) for d in units], val_fraction, seed, name)
    train, val = [], []
    for k, docs in enumerate(units):
        for doc, out in zip(docs, held.mask(k, 0, len(docs)).tolist(), strict=True):
            (val if out else train).append(doc)
    return train, val


# How held-out documents are chosen (in a version's record: one trained under another rule held out others).
HELD_OUT_RULE = "document hash v1"

# Bumped whenever what a trained tokenizer is changes, so cached ones from before are not reused
# (v1: SentencePiece with NFKC and whitespace collapsing, trained line by line; v2: lossless).
TRAINED_TOKENIZER_VERSION = 2


def resolve_tokenizer(cfg: TokenizerConfig, reads: dict[str, SourceRead], cache_dir: str | None,
                      written: Written | None = None) -> Tokenizer:
    """The run's tokenizer: bytes, a given file, or one trained on the sources (cached by settings and sources)."""
    if cfg.kind == "bytes":
        return ByteTokenizer()
    if cfg.path:
        path = os.path.expanduser(cfg.path)
        if cfg.kind == "hf":  # a Hugging Face tokenizer directory (tokenizer.json, else tokenizer.model) or file
            return load_tokenizer(path)
        return SentencePieceTokenizer.load(path) if cfg.kind == "sentencepiece" else load_hf_tokenizer(path)
    settings: dict[str, Any] = {"vocab_size": cfg.vocab_size, "user_defined_symbols": cfg.user_defined_symbols}
    if cfg.kind == "sentencepiece":
        settings.update(model_type=cfg.model_type, byte_fallback=cfg.byte_fallback)
    key = hashlib.sha256(json.dumps({"sources": {n: r.fingerprint for n, r in sorted(reads.items())}, "kind": cfg.kind,
                                     "version": TRAINED_TOKENIZER_VERSION, **settings},
                                    sort_keys=True).encode()).hexdigest()[:40]
    path = os.path.join(os.path.expanduser(cache_dir), "tokenizers", key) if cache_dir else None
    if path and os.path.isdir(path):
        try:
            return load_tokenizer(path)
        except TokenizerError:
            pass  # a damaged cache entry: train again and replace it
    texts = (d.text if d.prompt is None else d.prompt + d.text for r in reads.values() for d in r.iter_documents())
    tok = train_sentencepiece(texts, **settings) if cfg.kind == "sentencepiece" else train_bpe(texts, **settings)
    if path:
        if written is not None:
            written.folders(os.path.dirname(path))
        tmp = f"{path}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tok.save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
            if written is not None:
                written.add(path)
        except OSError:  # another process cached the same tokenizer first: same settings, same tokenizer
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_pipeline(data: DataConfig, tok_cfg: TokenizerConfig, batch_size: int, seq_len: int,
                   tokenizer: Tokenizer | None = None, log: Callable[[str], None] | None = None, *,
                   steps: int | None = None, keep_replay: bool = False, undo: bool = True) -> DataPipeline:
    """Read, tokenize (or load from cache), split and pack every source; weigh them into a mixture.

    `tokenizer` overrides `tok_cfg` (a run started from a model version keeps that version's tokenizer).
    `steps`: the run's length, over which data.replay.final_fraction is reached (without it, the mixture is
    data.replay.fraction throughout). `keep_replay`: build the replay sources even at fraction 0 (a
    forgetting budget may raise it, and evaluates them). `undo`: a run refused for its data removes what it
    added to the cache (tools/prepare_data.py keeps the files it finished instead).
    """
    r = data.replay
    new = [(s, False) for s in data.sources]
    keep = r.fraction > 0 or (r.final_fraction or 0.0) > 0 or keep_replay
    old = [(s, True) for s in r.sources] if keep else []
    written = Written()  # what this run adds to the cache: undone if its data is refused
    memo = DigestMemo(os.path.join(os.path.expanduser(data.cache_dir), "files"), written) if data.cache_dir else None
    try:
        reads = {s.name: read_source(s, data.decode_errors, data.max_document_bytes, memo) for s, _ in new + old}
        if tokenizer is None:
            tokenizer = resolve_tokenizer(tok_cfg, {s.name: reads[s.name] for s, _ in new}, data.cache_dir, written)
        phases = replay_schedule(r.fraction, r.final_fraction, r.phases, steps)
        if data.readers > 1:
            from lmadapt.data.readers import build_readers  # noqa: PLC0415 - readers is built on this module

            return build_readers(data, new, old, reads, tokenizer, batch_size, seq_len, written, log, phases)
        components, val, described = build_components(data, new, old, reads, tokenizer, batch_size, seq_len,
                                                       written, log)
    except (DataError, TokenizerError) as e:  # refused for its data; an interrupt or a crash keeps the shards made
        if undo and not isinstance(e, WorkerError):
            written.undo()
        raise
    return DataPipeline(components, val, tokenizer, batch_size, seq_len, data.seed, described, phases,
                        data.shuffle_window)


def build_components(data: DataConfig, new: list, old: list, reads: dict[str, SourceRead], tokenizer: Tokenizer,
                     batch_size: int, seq_len: int, written: Written, log: Callable[[str], None] | None,
                     reader: Callable[[str], tuple] | None = None) -> tuple[list[Component], dict, dict]:
    """Tokenize (or load) and plan each source into its training component and held-out rows. `reader`: the
    share of one reader of data.readers, name -> (its part of the source, the source's held-out rule, its
    row-order salt)."""
    r = data.replay
    components, val, described = [], {}, {}
    for src, replay in new + old:
        if reader is None:
            tokenized = tokenize_source(src.name, reads[src.name], tokenizer, data.cache_dir, written, data.workers,
                                        log)
            held, salt = held_out(tokenized, data), ""
        else:
            tokenized, held, salt = reader(src.name)
        spec = PlanSpec(seq_len, tokenizer.pad_id, data.long_docs, data.shuffle_window, data.seed, src.name, salt)
        train_rows, val_rows = plan_source(tokenized, held, spec, data.cache_dir, written)
        _check_rows(src.name, train_rows, val_rows, batch_size, seq_len, salt)
        total = sum(s.weight for s, _ in (old if replay else new))
        weight = mixture_weight(r.fraction, replay, bool(old), src.weight, total)
        components.append(Component(src.name, train_rows, weight, replay, source_weight=src.weight, _seed=data.seed,
                                    salt=salt))
        val[src.name] = val_rows
        stats = dataclasses.asdict(train_rows.stats)
        described[src.name] = {"weight": weight, "replay": replay, "fingerprint": tokenized.fingerprint,
                               "train_rows": train_rows.n_rows, "val_rows": val_rows.n_rows,
                               "replaced_chars": tokenized.replaced_chars, "cache_hit": tokenized.cache_hit, **stats}
        if log:
            log(_summary(src.name, described[src.name], data.long_docs))
    return components, val, described


def held_out(tokenized: TokenizedSource, data: DataConfig) -> HeldOut:
    """The held-out rule of a whole source (a reader's part takes its whole source's)."""
    return HeldOut(tokenized.unit_ids, tokenized.unit_docs, data.val_fraction, data.seed, tokenized.name)


def _check_rows(name: str, train_rows: PackedRows, val_rows: PackedRows, batch_size: int, seq_len: int,
                salt: str) -> None:
    where = f"source {name!r}" + (f" (reader {salt[1:]} of data.readers)" if salt else "")
    if train_rows.n_rows < batch_size:
        raise DataError(f"{where} packs into {train_rows.n_rows} training rows of {seq_len} tokens, fewer than one "
                        f"batch ({'a reader' if salt else 'train.batch_size'}={batch_size}); add data or use a "
                        f"smaller batch" + (" or fewer readers" if salt else ""))
    if val_rows.n_rows == 0 and not salt:  # a reader's may be empty: the source's held-out set is not
        raise DataError(f"{where}: the held-out split is empty; raise data.val_fraction")


def _summary(name: str, d: dict[str, Any], long_docs: str) -> str:
    line = (f"data {name}: {d['documents']:,} docs -> {d['train_rows']:,} train rows, {d['val_rows']:,} held-out rows, "
            f"weight {d['weight']:.3f}{' (replay)' if d['replay'] else ''}, "
            f"{'cached' if d['cache_hit'] else 'tokenized'}")
    if d["split_documents"] and long_docs == "split":
        line += f"; {d['split_documents']:,} long docs split"
    if d["truncated_tokens"]:
        line += f"; {d['truncated_tokens']:,} tokens truncated from long docs"
    if d["replaced_chars"]:
        line += f"; {d['replaced_chars']:,} undecodable bytes replaced"
    return line
