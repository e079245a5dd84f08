"""Packing invariants (property tests): every input token once, segments apart, loss mask exact."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmadapt.data.packing import pack

PAD = -1


def corpus(doc_lengths, prompt_lengths):
    """Flat tokens where token value == its index (so rows can be traced back), doc starts and weights."""
    starts = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    tokens = np.arange(starts[-1], dtype=np.int64)
    weights = np.ones(starts[-1], np.uint8)
    for s, p in zip(starts[:-1], prompt_lengths, strict=True):
        weights[s:s + p] = 0  # prompt tokens: context only
    return tokens, starts, weights


docs = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(docs=docs, seq_len=st.integers(1, 24), long_docs=st.sampled_from(["split", "truncate"]),
       shuffle=st.booleans())
def test_packing_invariants(docs, seq_len, long_docs, shuffle):
    lengths = [n for n, _ in docs]
    prompts = [min(p, n) for n, p in docs]
    tokens, starts, weights = corpus(lengths, prompts)
    ids = np.arange(len(lengths))
    packed = pack(tokens, weights, starts, ids, seq_len, PAD, long_docs, shuffle_seed=0 if shuffle else None)
    batch = packed.rows(np.arange(packed.n_rows))

    seen = []
    for r in range(packed.n_rows):
        real = batch["segment_ids"][r] > 0
        n = int(real.sum())
        # Real tokens fill a prefix of the row; the rest is padding without loss.
        assert real[:n].all() and not real[n:].any()
        assert (batch["loss_mask"][r][~real] == 0).all() and (batch["tokens"][r][~real] == PAD).all()
        segs = batch["segment_ids"][r][:n]
        row = {k: v[r][:n] for k, v in batch.items()}
        assert (np.diff(segs) >= 0).all()  # segments are contiguous, never interleaved
        for s in np.unique(segs):
            span = segs == s
            inp, tgt, pos = row["tokens"][span], row["targets"][span], row["positions"][span]
            # One segment = consecutive tokens of one document, targets shifted by one, positions from 0.
            np.testing.assert_array_equal(tgt, inp + 1)
            np.testing.assert_array_equal(pos, np.arange(len(inp)))
            doc = np.searchsorted(starts, inp, side="right") - 1
            assert (doc == doc[0]).all() and inp[-1] + 1 < starts[doc[0] + 1]
            # The loss mask covers exactly the completion tokens among the targets.
            np.testing.assert_array_equal(row["loss_mask"][span], weights[tgt])
        seen.extend(batch["tokens"][r][:n].tolist())

    # Every input token (each document's tokens but its last) appears exactly once when splitting;
    # truncation keeps each document's first seq_len of them.
    expected = []
    for s, n in zip(starts[:-1], lengths, strict=True):
        keep = n - 1 if long_docs == "split" else min(n - 1, seq_len)
        expected.extend(range(s, s + keep))
    assert sorted(seen) == expected
    assert packed.stats.input_tokens == len(expected)
    total_loss = int(packed.row_loss_tokens().sum())
    assert total_loss == int(batch["loss_mask"].sum())


def test_full_pieces_do_not_waste_rows():
    # 10 documents of 3.5 rows each: 30 full pieces fill 30 rows, the 10 half pieces share 5.
    tokens, starts, weights = corpus([3 * 8 + 4 + 1] * 10, [0] * 10)
    packed = pack(tokens, None, starts, np.arange(10), 8, PAD, "split", shuffle_seed=1)
    assert packed.n_rows == 35
    assert packed.stats.split_documents == 10


def test_empty_row_index_gives_a_masked_row():
    tokens, starts, _ = corpus([5, 6], [0, 0])
    packed = pack(tokens, None, starts, np.arange(2), 8, PAD)
    batch = packed.rows(np.array([-1, 0]))
    assert batch["loss_mask"][0].sum() == 0 and batch["segment_ids"][0].sum() == 0
    assert packed.n_rows == 2 and batch["loss_mask"][1].sum() == 4  # 4 + 5 pairs do not fit one row of 8
