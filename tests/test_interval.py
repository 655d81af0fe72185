"""The adaptive checkpoint interval (Young/Daly) and its serialisable state."""

from __future__ import annotations

import json
import math
import random

import pytest

from elastic_train.interval import AdaptiveInterval


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, **kw) -> AdaptiveInterval:
    kw.setdefault("min_steps", 5)
    kw.setdefault("max_steps", 500)
    return AdaptiveInterval(clock=clock, **kw)


def test_no_interruption_and_no_prior_uses_the_maximum():
    clock = Clock()
    ai = make(clock)
    assert ai.next_interval_steps() == 500
    ai.observe_step_time(0.5)
    ai.observe_checkpoint_cost(0.1, 1.9)
    clock.t += 3600
    assert ai.next_interval_steps() == 500


def test_interruptions_before_any_save_ask_for_a_save_soon():
    clock = Clock()
    ai = make(clock)
    ai.observe_step_time(0.5)
    clock.t += 60
    ai.observe_interruption()
    assert ai.next_interval_steps() == 5


def test_young_daly_in_steps():
    clock = Clock()
    ai = make(clock)
    start = clock.t
    ai.start_at(start)
    for _ in range(10):
        ai.observe_step_time(0.5)
    ai.observe_checkpoint_cost(stall_s=0.5, commit_s=1.5)  # C = 2 s
    for k in range(1, 11):  # one interruption every 100 s: M = 100 s
        ai.observe_interruption(start + 100 * k)
    clock.t = start + 1000
    assert ai.mtbi_s() == pytest.approx(100.0)
    assert ai.interval_s() == pytest.approx(20.0)  # sqrt(2 * 2 * 100)
    assert ai.next_interval_steps() == 40  # 20 s / 0.5 s per step


def test_the_choice_minimises_expected_waste():
    # Waste per second of work with interval T: C/T (saving) + T/(2M) (lost on failure).
    clock = Clock()
    ai = make(clock, min_steps=1, max_steps=10_000)
    ai.start_at(clock.t)
    ai.observe_step_time(0.2)
    ai.observe_checkpoint_cost(0.3, 0.9)
    for k in range(1, 7):
        ai.observe_interruption(clock.t + 300 * k)
    clock.t += 1800
    c, m = ai.checkpoint_cost_s, ai.mtbi_s()
    assert c is not None and m is not None

    def waste(steps: int) -> float:
        t = steps * 0.2
        return c / t + t / (2 * m)

    chosen = ai.next_interval_steps()
    best = min(range(1, 2000), key=waste)
    assert abs(chosen - best) <= 1
    assert waste(chosen) <= 1.001 * waste(best)


def test_prior_is_used_until_interruptions_are_seen_and_then_blends():
    clock = Clock()
    ai = make(clock, prior_mtbi_s=3600.0)
    ai.start_at(clock.t)
    ai.observe_step_time(1.0)
    # Interruptions are expected and C is unknown: save soon to learn it (a fault-free first
    # hour would otherwise run to max_steps unprotected).
    assert ai.next_interval_steps() == 5
    ai.observe_checkpoint_cost(1.0, 1.0)
    assert ai.next_interval_steps() == round(math.sqrt(2 * 2.0 * 3600))  # 120
    clock.t += 600
    ai.observe_interruption()
    assert ai.mtbi_s() == pytest.approx((600 + 3600) / 2)
    assert ai.next_interval_steps() < 120


def test_bounds_hold():
    clock = Clock()
    ai = make(clock, min_steps=10, max_steps=20)
    ai.start_at(clock.t)
    ai.observe_step_time(0.01)
    ai.observe_checkpoint_cost(100.0)
    ai.observe_interruption(clock.t + 10_000)
    clock.t += 100_000
    assert ai.next_interval_steps() == 20
    ai2 = make(clock, min_steps=10, max_steps=20)
    ai2.start_at(clock.t)
    ai2.observe_step_time(100.0)
    ai2.observe_checkpoint_cost(0.001)
    clock.t += 10
    ai2.observe_interruption()
    assert ai2.next_interval_steps() == 10


def test_medians_ignore_a_slow_first_step_and_odd_values():
    clock = Clock()
    ai = make(clock)
    ai.observe_step_time(30.0)  # first step after a restart: compile, warm-up
    for _ in range(20):
        ai.observe_step_time(0.5)
    for bad in (-1.0, float("nan"), float("inf"), 0.0):
        ai.observe_step_time(bad)
        ai.observe_checkpoint_cost(bad)
    assert ai.step_time_s == 0.5
    assert ai.checkpoint_cost_s is None


def test_interruptions_are_deduplicated():
    clock = Clock()
    ai = make(clock, dedupe_s=5.0)
    assert ai.observe_interruption(100.0)
    assert not ai.observe_interruption(103.0)
    assert ai.observe_interruption(200.0)
    assert not ai.observe_interruption(float("nan"))
    assert ai.interruptions == 2


def test_state_roundtrips_through_json_and_merges_history():
    clock = Clock()
    rng = random.Random(0)
    ai = make(clock, prior_mtbi_s=900.0)
    ai.start_at(clock.t - 5000)
    for _ in range(60):
        ai.observe_step_time(rng.uniform(0.4, 0.6))
    for _ in range(3):
        ai.observe_checkpoint_cost(rng.uniform(0.0, 0.2), rng.uniform(0.5, 1.0))
    for k in range(4):
        ai.observe_interruption(clock.t - 4000 + 1000 * k)
    state = json.loads(json.dumps(ai.state_dict()))
    back = AdaptiveInterval.from_state_dict(state, clock=clock)
    assert back.state_dict() == ai.state_dict()
    assert back.next_interval_steps() == ai.next_interval_steps()
    # After a restart the trainer may feed the same history again: nothing double-counts.
    for k in range(4):
        back.observe_interruption(clock.t - 4000 + 1000 * k)
    assert back.interruptions == 4
    other = AdaptiveInterval.from_state_dict(state, min_steps=1, max_steps=2, clock=clock)
    assert other.max_steps == 2 and other.next_interval_steps() <= 2


def test_bad_configuration_raises():
    with pytest.raises(ValueError):
        AdaptiveInterval(0, 10)
    with pytest.raises(ValueError):
        AdaptiveInterval(10, 5)
    with pytest.raises(ValueError):
        AdaptiveInterval(1, 5, prior_mtbi_s=0.0)


def test_commit_callbacks_from_another_thread_are_safe():
    import threading

    ai = AdaptiveInterval(1, 100)
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            ai.observe_checkpoint_cost(0.01, 0.2)

    t = threading.Thread(target=feed)
    t.start()
    try:
        for _ in range(2000):
            ai.observe_step_time(0.1)
            json.dumps(ai.state_dict())
            ai.next_interval_steps()
    finally:
        stop.set()
        t.join()
