"""Learning-rate schedules, and the two levers of a run from a version: rewarm_fraction and carry (no training)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests_paths import TINY

from lmadapt.config import ConfigError, load_config
from lmadapt.optim import make_schedule, parent_schedule, schedule_entry, schedule_start

CHILD = ["init.from_version=base", "lineage.dir=/nonexistent/lineage"]


def sched(*overrides):
    return load_config(TINY, [*CHILD, *overrides]).schedule


def curve(schedule, steps):
    # Through jit: the schedule is called on the traced step inside the train step.
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps, dtype=jnp.int32)))


def record(steps=40, lr=3e-3, schedule=None, vid="base"):
    strategy = {"kind": "pretrain"} if schedule is None else {"kind": "full", "schedule": schedule}
    return {"id": vid, "steps": steps, "config": {"optimizer": {"lr": lr}}, "strategy": strategy}


def test_offset_zero_is_the_plain_schedules():
    cos = sched("schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1")
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, 1e-4)
    np.testing.assert_array_equal(curve(make_schedule(cos, 1e-3, 100), 120), curve(want, 120))
    wsd = make_schedule(sched("schedule.kind=wsd", "schedule.warmup_steps=10", "schedule.decay_fraction=0.2"),
                        1.0, 100)
    lr = curve(wsd, 100)
    np.testing.assert_allclose(lr[:10], np.arange(10) / 10, rtol=1e-6)
    assert (lr[10:80] == 1.0).all() and lr[80] == 1.0 and 0.1 < lr[99] < lr[81] < 1.0
    const = curve(make_schedule(sched("schedule.kind=constant", "schedule.warmup_steps=4"), 2.0, 10), 10)
    np.testing.assert_allclose(const, [0, 0.5, 1, 1.5, 2, 2, 2, 2, 2, 2], rtol=1e-6)


def test_rewarm_fraction_scales_the_parents_peak():
    cfg = load_config(TINY, [*CHILD, "schedule.rewarm_fraction=0.5", "schedule.warmup_steps=10",
                             "schedule.min_lr_ratio=0.1", "train.steps=100", "optimizer.lr=9.0"])
    parent_peak = 2e-3
    peak, offset = schedule_start(cfg, record(lr=parent_peak))
    assert peak == pytest.approx(0.5 * parent_peak) and offset == 0  # optimizer.lr is not the peak
    lr = curve(make_schedule(cfg.schedule, peak, cfg.train.steps, offset), 100)
    for t in range(100):
        shape = t / 10 if t < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
        assert lr[t] == pytest.approx(0.5 * parent_peak * shape, rel=1e-5), t


def test_carried_cosine_is_the_lineage_cosine_from_the_parents_position():
    cos = sched("schedule.warmup_steps=100", "schedule.min_lr_ratio=0.1")
    whole = curve(make_schedule(cos, 1e-3, 300), 300)
    carried = curve(make_schedule(cos, 1e-3, 150, offset=150), 150)  # decay_steps null: to this run's end
    np.testing.assert_array_equal(carried, whole[150:])
    assert carried[0] > 0.5e-3  # no warmup: the carried position is past warmup_steps
    fixed = sched("schedule.warmup_steps=100", "schedule.decay_steps=300")
    np.testing.assert_array_equal(curve(make_schedule(fixed, 1e-3, 80, offset=150), 80), whole[150:230])
    # Inside warmup the carried run finishes the parent's warmup instead of restarting it.
    np.testing.assert_array_equal(curve(make_schedule(cos, 1e-3, 250, offset=50), 250), whole[50:])


def test_carried_wsd_and_constant_do_not_rewarm():
    wsd = sched("schedule.kind=wsd", "schedule.warmup_steps=10", "schedule.decay_fraction=0.2")
    lr = curve(make_schedule(wsd, 1.0, 50, offset=200), 50)
    assert (lr[:40] == 1.0).all()  # stable from the first step
    np.testing.assert_allclose(lr[40:], np.linspace(1.0, 0.1, 11)[:10], rtol=1e-5)  # this run's last 20%
    inside = curve(make_schedule(wsd, 1.0, 50, offset=4), 50)
    np.testing.assert_allclose(inside[:6], np.arange(4, 10) / 10, rtol=1e-6)
    assert (inside[6:40] == 1.0).all() and inside[49] < 1.0
    const = sched("schedule.kind=constant", "schedule.warmup_steps=10")
    assert (curve(make_schedule(const, 2.0, 5, offset=10), 5) == 2.0).all()
    np.testing.assert_allclose(curve(make_schedule(const, 2.0, 3, offset=8), 3), [1.6, 1.8, 2.0], rtol=1e-6)


def test_schedule_start_reads_the_parent_record():
    entry = {"kind": "cosine", "peak_lr": 1e-3, "start": 40, "end": 90}
    assert parent_schedule(record(steps=50, lr=5.0, schedule=entry)) == (1e-3, 90)
    assert parent_schedule(record(steps=50, lr=5e-3)) == (5e-3, 50)  # a version from before the entry
    old = {"kind": "cosine", "warmup_steps": 5}  # the schedule config alone, as older records hold it
    assert parent_schedule(record(steps=50, lr=5e-3, schedule=old)) == (5e-3, 50)
    both = load_config(TINY, [*CHILD, "schedule.rewarm_fraction=0.5", "schedule.carry=true", "train.steps=10"])
    peak, offset = schedule_start(both, record(steps=50, lr=5.0, schedule=entry))
    assert (peak, offset) == (pytest.approx(5e-4), 90)
    assert schedule_entry(both, record(steps=50, lr=5.0, schedule=entry)) == {
        "peak_lr": pytest.approx(5e-4), "start": 90, "end": 100}
    carry = load_config(TINY, [*CHILD, "schedule.carry=true", "optimizer.lr=7e-4"])
    assert schedule_start(carry, record(steps=50, lr=5e-3)) == (7e-4, 50)  # carry alone keeps optimizer.lr
    plain = load_config(TINY, [])
    assert schedule_start(plain, None) == (plain.optimizer.lr, 0)
    with pytest.raises(ConfigError, match="schedule.rewarm_fraction: version 'm' records no peak"):
        schedule_start(load_config(TINY, [*CHILD, "schedule.rewarm_fraction=0.5"]),
                       {"id": "m", "steps": 0, "config": {}, "strategy": {"kind": "merge"}})


@pytest.mark.parametrize(("overrides", "message"), [
    (["schedule.rewarm_fraction=0.5"], "key 'schedule.rewarm_fraction' has value 0.5; expected null unless "
                                       "init.from_version"),
    (["schedule.carry=true"], "key 'schedule.carry' has value True; expected false unless init.from_version"),
    ([*CHILD, "schedule.rewarm_fraction=0"], "key 'schedule.rewarm_fraction' has value 0.0; expected a number in "
                                             r"\(0, 10\] or null"),
    ([*CHILD, "schedule.rewarm_fraction=11"], r"expected a number in \(0, 10\] or null"),
])
def test_schedule_levers_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)
    ok = load_config(TINY, [*CHILD, "schedule.rewarm_fraction=10", "schedule.carry=true"])
    assert ok.schedule.rewarm_fraction == 10.0 and ok.schedule.carry
