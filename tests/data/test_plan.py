"""Packing plans and the stateless index functions: windows bound which documents share a row, a stored plan is
the in-memory one, a damaged one is planned again, the held-out rule is per document, permutations are
bijections."""

import os

import numpy as np
import pytest
from test_pipeline import batches_equal, data_config, make, source, write_corpus

from lmadapt.config import DataConfig
from lmadapt.data import DataError
from lmadapt.data.pipeline import held_out_split
from lmadapt.data.shuffle import HeldOut, permute
from lmadapt.data.sources import read_source
from lmadapt.data.token_cache import tokenize_source


def doc_of_pieces(rows, doc_starts):
    return np.searchsorted(doc_starts, rows.piece_start, side="right") - 1


def test_a_window_packs_only_its_own_documents(tmp_path):
    write_corpus(tmp_path / "a.txt", 200, 0, words_per_doc=(3, 30))
    src = [source("a", tmp_path / "a.txt")]
    whole = make(data_config(tmp_path, src, val_fraction=0.1))
    windowed = make(data_config(tmp_path, src, val_fraction=0.1, shuffle_window=16))
    assert windowed.describe()["shuffle_window"] == 16
    rows = windowed.components[0].rows
    doc_starts = tokenize_source("a", read_source(src[0]), whole.tokenizer, str(tmp_path / "cache")).doc_starts
    docs = doc_of_pieces(rows, doc_starts)
    for r in range(rows.n_rows):
        lo, hi = rows.row_offsets[r], rows.row_offsets[r + 1]
        assert len(set((docs[lo:hi] // 16).tolist())) == 1, f"row {r} mixes windows"
    # The same documents and pieces either way, each in exactly one row; at most one extra row a window.
    full = whole.components[0].rows
    assert sorted(zip(rows.piece_start.tolist(), rows.piece_len.tolist(), strict=True)) == \
        sorted(zip(full.piece_start.tolist(), full.piece_len.tolist(), strict=True))
    assert full.n_rows <= rows.n_rows <= full.n_rows + -(-200 // 16)


def test_a_stored_plan_is_the_in_memory_one_and_a_damaged_one_is_planned_again(tmp_path):
    write_corpus(tmp_path / "a.txt", 120, 1)
    write_corpus(tmp_path / "b.txt", 80, 2)
    src = [source("a", tmp_path / "a.txt"), source("b", tmp_path / "b.txt")]
    stored = make(data_config(tmp_path, src, shuffle_window=32))
    memory = make(DataConfig(sources=src, shuffle_window=32, cache_dir=""))
    for step in range(6):
        assert batches_equal(stored.batch(step), memory.batch(step))
    assert stored.tokens_seen(40) == memory.tokens_seen(40)
    plans = tmp_path / "cache" / "plans"
    entries = sorted(os.listdir(plans))
    assert len(entries) == 2 and not [e for e in entries if e.startswith(".tmp-")]
    column = plans / entries[0] / "train_row_loss.npy"
    column.write_bytes(column.read_bytes()[:-8])  # a plan cut short (a disk filled, a hand edit)
    again = make(data_config(tmp_path, src, shuffle_window=32))
    for step in range(6):
        assert batches_equal(again.batch(step), memory.batch(step))
    assert sorted(os.listdir(plans)) == entries
    assert any(np.array_equal(np.load(column), c.rows.loss_tokens) for c in memory.components)  # whole again


def test_held_out_is_a_decision_per_document(tmp_path):
    a, b = [(1 << 63) + 5, 12345], [3000, 2000]
    held = HeldOut(a, b, 0.1, 0, "s")
    grown = HeldOut([*a, 999], [*b, 500], 0.1, 0, "s")  # a file added to the source
    for k, n in enumerate(b):
        np.testing.assert_array_equal(held.mask(k, 0, n), grown.mask(k, 0, n))
        np.testing.assert_array_equal(held.mask(k, 100, 200), held.mask(k, 0, n)[100:200])
    assert 400 <= held.n_val <= 600 == 600 and held.n_val == sum(int(held.mask(k, 0, n).sum()) for k, n in
                                                                 enumerate(b))
    assert not np.array_equal(held.mask(0, 0, 3000), HeldOut(a, b, 0.1, 1, "s").mask(0, 0, 3000))  # the seed
    few = HeldOut([7], [3], 1e-6, 0, "s")  # no hash below the fraction: the lowest is held out
    assert few.n_val == 1 == int(few.mask(0, 0, 3).sum())
    most = HeldOut([7], [3], 1 - 1e-9, 0, "s")
    assert most.n_val == 2 == int(most.mask(0, 0, 3).sum())
    with pytest.raises(DataError, match="'s' has 1 document; a held-out split needs at least 2"):
        HeldOut([7], [1], 0.5, 0, "s")


def test_documents_split_as_the_pipeline_splits_them(tmp_path):
    write_corpus(tmp_path / "a.txt", 150, 3)
    src = source("a", tmp_path / "a.txt")
    pipe = make(data_config(tmp_path, [src], val_fraction=0.2))
    train, val = held_out_split(read_source(src), 0.2, 0, "a")
    assert (len(train), len(val)) == (pipe.components[0].rows.stats.documents, pipe.val["a"].stats.documents)
    row = pipe.val["a"].rows(np.array([0]))  # held-out rows keep document order: row 0 starts the first
    first = row["tokens"][0][row["segment_ids"][0] == 1].tolist()
    tok = pipe.tokenizer
    assert first == ([tok.bos_id] * (tok.bos_id >= 0) + tok.encode([val[0].text])[0] + [tok.eos_id])[:len(first)]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000, 4099])
def test_permute_is_a_bijection_chosen_by_its_key(n):
    got = permute(np.arange(n), n, key=11)
    np.testing.assert_array_equal(np.sort(got), np.arange(n))
    np.testing.assert_array_equal(permute(np.arange(n)[::-1].copy(), n, 11), got[::-1])  # any index, any order
    if n > 16:
        assert not np.array_equal(got, permute(np.arange(n), n, key=12))
        assert not np.array_equal(got, np.arange(n))
