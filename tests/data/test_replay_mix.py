"""Replay levers in the mixture: phases (a fraction that changes at given steps), the final_fraction
schedule, and the "tokens" spread of the replay share over the lineage's sources."""

import dataclasses

import numpy as np
import pytest

from lmadapt.config import Config, DataConfig, ReplayConfig, SourceConfig, TokenizerConfig
from lmadapt.continual.replay import lineage_tokens, token_shares, with_token_spread
from lmadapt.data.pipeline import build_pipeline, replay_schedule

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
BATCH = 10


def write_corpus(path, n_docs, seed):
    rng = np.random.default_rng(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS, rng.integers(20, 120))) for _ in range(n_docs)) + "\n",
                    encoding="utf-8")


def source(name, path, weight=1.0):
    return SourceConfig(name=name, path=str(path), documents="blank_line", weight=weight)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for i, name in enumerate(("a", "b", "old1", "old2")):
        write_corpus(root / f"{name}.txt", 150, i)
    return root


def make(root, fraction=0.3, old_weights=(1.0, 3.0), **kw):
    replay = ReplayConfig(fraction=fraction, sources=tuple(source(f"old{i + 1}", root / f"old{i + 1}.txt", w)
                                                           for i, w in enumerate(old_weights)), **kw.pop("replay", {}))
    data = DataConfig(sources=(source("a", root / "a.txt", 3.0), source("b", root / "b.txt")), replay=replay,
                      cache_dir=str(root / "cache"))
    return build_pipeline(data, TokenizerConfig(), BATCH, 32, **kw)


def same(x, y):
    return all(np.array_equal(x[k], y[k]) for k in x)


def shares(p, fraction):
    """Each source's expected share of a batch at replay `fraction` (weights within the groups as configured)."""
    new = [c for c in p.components if not c.replay]
    old = [c for c in p.components if c.replay]
    return {**{c.name: (1 - fraction) * c.source_weight / sum(n.source_weight for n in new) for c in new},
            **{c.name: fraction * c.source_weight / sum(o.source_weight for o in old) for c in old}}


def test_one_phase_is_the_single_mixture_and_zero_weight_sources_change_nothing(corpora):
    p = make(corpora)
    assert p.phases == [(0, 0.3)] and p.describe()["replay_phases"] == [[0, 0.3]]
    q = p.with_phases([(0, 0.3)])
    assert all(same(p.batch(s), q.batch(s)) for s in range(0, 40, 3))
    assert p.tokens_seen(37) == q.tokens_seen(37)
    # Replay sources kept at fraction 0 (a budget may raise it) draw nothing: the batches of no replay at all.
    kept, none = make(corpora, fraction=0.0, keep_replay=True), make(corpora, fraction=0.0)
    assert len(kept.components) == 4 and len(none.components) == 2
    assert all(same(kept.batch(s), none.batch(s)) for s in range(0, 40, 3))
    assert kept.tokens_seen(20) == {**none.tokens_seen(20), "old1": 0, "old2": 0}


PHASES = [(0, 0.2), (7, 0.5), (15, 0.0), (22, 0.4)]


def test_counts_per_source_follow_each_phase_exactly(corpora):
    p = make(corpora).with_phases(PHASES)
    ends = [s for s, _ in PHASES[1:]] + [40]
    for (start, f), end in zip(PHASES, ends, strict=True):
        single = p.with_phases([(0, f)])
        want = shares(p, f)
        totals = dict.fromkeys(want, 0)
        for step in range(start, end):
            counts = p.source_counts(step)
            # The phase's slots are counted from its first step: the single mixture's counts, shifted.
            assert counts == single.source_counts(step - start), (step, counts)
            for name, c in counts.items():
                assert abs(c - BATCH * want[name]) < 1 + 1e-9, (step, counts)
                totals[name] += c
        for name, total in totals.items():  # the whole window: floor or ceil of window * share
            assert abs(total - (end - start) * BATCH * want[name]) <= 1, (start, name, total)


def test_rows_are_drawn_once_per_epoch_across_phases_and_tokens_seen_is_exact(corpora):
    p = make(corpora).with_phases(PHASES)
    draws = {k: [] for k in range(len(p.components))}
    for step in range(40):
        comp, index = p.draws(step)
        for k in draws:
            draws[k] += index[comp == k].tolist()
        if step + 1 in (1, 7, 8, 15, 16, 22, 23, 40):  # around every boundary
            seen = p.tokens_seen(step + 1)
            for k, c in enumerate(p.components):
                # Draw indices run 0, 1, 2, ... with no gap or repeat: every row once per epoch.
                assert sorted(draws[k]) == list(range(len(draws[k])))
                assert seen[c.name] == int(c.loss_tokens[c.row_of(np.array(draws[k], np.int64))].sum())
            assert sum(seen.values()) == int(sum(p.batch(s)["loss_mask"].sum() for s in range(step + 1)))
    # The batch is built from exactly those draws (the second process's half included).
    comp, index = p.draws(30)
    half = p.batch(30, slice(5, 10))
    for i, (k, j) in enumerate(zip(comp[5:].tolist(), index[5:].tolist(), strict=True)):
        c = p.components[k]
        row = c.rows.rows(c.row_of(np.array([j])))
        assert all(np.array_equal(half[key][i], row[key][0]) for key in half)


def test_phases_are_checked(corpora):
    p = make(corpora)
    for bad in ([], [(1, 0.2)], [(0, 0.2), (5, 0.3), (5, 0.4)], [(0, 0.2), (3, 1.0)]):
        with pytest.raises(ValueError, match="phases"):
            p.set_phases(bad)
    with pytest.raises(ValueError, match="no replay sources"):
        make(corpora, fraction=0.0).set_phases([(0, 0.0), (4, 0.2)])
    assert p.phases == [(0, 0.3)]  # a refused change leaves the mixture as it was


def test_final_fraction_moves_in_equal_phases(corpora):
    def close(phases, want):
        return [s for s, _ in phases] == [s for s, _ in want] and \
            [f for _, f in phases] == pytest.approx([f for _, f in want])

    assert close(replay_schedule(0.1, 0.5, 5, 100), [(0, 0.1), (20, 0.2), (40, 0.3), (60, 0.4), (80, 0.5)])
    assert replay_schedule(0.4, 0.0, 2, 9) == [(0, 0.4), (4, 0.0)]
    assert close(replay_schedule(0.0, 0.3, 4, 2), [(0, 0.1), (1, 0.3)])  # shorter than n phases
    assert replay_schedule(0.2, None, 4, 100) == [(0, 0.2)]
    # From zero: the replay sources are built, and take their share from the second phase on.
    p = make(corpora, fraction=0.0, replay={"final_fraction": 0.4, "phases": 3}, steps=30)
    assert close(p.phases, [(0, 0.0), (10, 0.2), (20, 0.4)])
    assert p.describe()["replay_phases"] == [list(x) for x in p.phases]
    replayed = [sum(p.source_counts(s)["old1"] + p.source_counts(s)["old2"] for s in range(a, a + 10))
                for a in (0, 10, 20)]
    assert replayed[0] == 0 and abs(replayed[1] - 20) <= 2 and abs(replayed[2] - 40) <= 2


class FakeLineage:
    def __init__(self, records):
        self.records = records

    def exists(self, vid):
        return vid in self.records

    def record(self, vid):
        return self.records[vid]


def test_tokens_spread_sums_the_lineage_and_gives_unknown_sources_the_mean_share(corpora):
    recs = {"root": {"parents": [], "data": {"tokens_seen": {"old1": 1000}}},
            "side": {"parents": ["root"], "data": {"tokens_seen": {"old2": 500}}},
            "mid": {"parents": ["root"], "data": {"tokens_seen": {"old1": 2000, "old2": 0}}},
            "merge": {"parents": ["mid", "side", "gone"], "data": {}}}
    totals = lineage_tokens(FakeLineage(recs), "merge")
    assert totals == {"old1": 3000, "old2": 500}  # root counted once; a missing parent adds nothing
    assert token_shares(totals, ["old1", "old2"]) == pytest.approx({"old1": 6 / 7, "old2": 1 / 7})
    assert token_shares(totals, ["old1", "old2", "new"]) == pytest.approx({"old1": 6 / 7, "old2": 1 / 7, "new": 0.5})
    assert token_shares({}, ["x", "y"]) == {"x": 0.5, "y": 0.5}
    cfg = Config()
    replay = ReplayConfig(fraction=0.4, spread="tokens", sources=(source("old1", corpora / "old1.txt"),
                                                                   source("old2", corpora / "old2.txt", 5.0)))
    cfg = with_token_spread(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, replay=replay)), totals)
    weights = tuple(s.weight for s in cfg.data.replay.sources)
    assert weights == pytest.approx((6 / 7, 1 / 7))
    # Passed on as the replay sources' weights: the replay share splits 6:1 over a window of steps.
    p = make(corpora, fraction=0.35, old_weights=weights)
    totals = dict.fromkeys(("old1", "old2"), 0)
    for step in range(70):
        for name in totals:
            totals[name] += p.source_counts(step)[name]
    assert abs(totals["old1"] - 700 * 0.35 * 6 / 7) <= 1 and abs(totals["old2"] - 700 * 0.35 / 7) <= 1
