"""The save policy in one process (no torchrun, no process group): when it saves, what it learns
from commits, what it keeps in a checkpoint."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from checkpointing import CheckpointConfig, CheckpointManager
from elastic_train.interval import AdaptiveInterval
from elastic_train.join_requests import JoinRequests
from elastic_train.node import contract
from elastic_train.notices import Notice, NoticeWatcher
from elastic_train.save_policy import Save, SavePolicy

STEPS = 100


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy(clock: Clock | None = None, **kw: Any) -> SavePolicy:
    clock = clock or Clock()
    return SavePolicy(STEPS, NoticeWatcher([]), clock=clock, **kw)


def adaptive(clock: Clock, min_steps: int = 2, max_steps: int = 5) -> AdaptiveInterval:
    return AdaptiveInterval(min_steps, max_steps, clock=clock)


def decided(p: SavePolicy, step: int, notice: Notice | None = None) -> Save:
    """What a world of one agrees on at `step` (its votes are the all-reduced sums)."""
    return p.decide(p.votes(step, notice))


def test_a_fixed_interval_saves_at_multiples_of_every_except_the_final_step():
    p = policy(every=10)
    assert [s for s in range(1, STEPS + 1) if decided(p, s) is Save.DUE] == list(range(10, 100, 10))


def test_every_zero_saves_only_the_final_step_which_the_trainer_does_itself():
    p = policy(every=0)
    assert all(decided(p, s) is Save.NO for s in range(1, STEPS + 1))


def test_an_adaptive_interval_counts_from_the_last_save():
    clock = Clock()
    p = policy(clock, every=3, interval=adaptive(clock))  # no interruption yet: max_steps
    assert [s for s in range(1, 11) if decided(p, s) is Save.DUE] == [5, 6, 7, 8, 9, 10]
    p.record_save(5)
    assert [s for s in range(6, 16) if decided(p, s) is Save.DUE] == [10, 11, 12, 13, 14, 15]


def test_only_rank_0_wishes_for_a_save_and_any_notice_wins():
    p = policy(every=10, is_main=False)
    assert p.votes(10, None) == [0.0, 0.0]
    notice = Notice("file", None, "test", 0.0)
    assert p.votes(11, notice) == [1.0, 0.0]
    assert SavePolicy.decide([1.0, 1.0]) is Save.NOTICE
    assert SavePolicy.decide([0.0, 1.0]) is Save.DUE


def test_commits_teach_the_adaptive_interval_what_a_save_costs():
    clock = Clock()
    p = policy(clock, interval=adaptive(clock, max_steps=500))
    p.resume(restored_step=None, restarted=True)  # an interruption, cost unknown: save soon
    p.observe_step_time(0.5)
    assert p.interval is not None and p.interval.next_interval_steps() == 2
    p.on_commit(4, stall_s=0.5, commit_s=1.5)
    assert p.interval.checkpoint_cost_s == 2.0
    clock.t += 100  # M = 100 s, C = 2 s: sqrt(2 * 2 * 100) = 20 s = 40 steps
    assert p.interval.next_interval_steps() == 40


def test_a_restore_or_a_restart_counts_one_interruption_and_a_first_start_none():
    clock = Clock()
    first = policy(clock, interval=adaptive(clock))
    first.resume(restored_step=None, restarted=False)
    assert first.interval is not None and first.interval.interruptions == 0
    assert first.last_save_step == 0
    again = policy(clock, interval=adaptive(clock))
    again.resume(restored_step=30, restarted=False)
    assert again.interval is not None and again.interval.interruptions == 1
    assert again.last_save_step == 30


@pytest.fixture
def join_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dist.TCPStore, str]]:
    """A rendezvous store on a free port, and this world's key, as an agent would set them."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    key = contract.round_key("test-policy", 1)
    monkeypatch.setenv(contract.RDZV_STORE_ENV, f"127.0.0.1:{store.port}")
    monkeypatch.setenv(contract.JOIN_KEY_ENV, key)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-policy")
    yield store, key


def test_a_node_asking_to_join_gets_a_save_of_the_step_under_way_then_gets_in(join_store):
    store, key = join_store
    requests = JoinRequests.from_env()
    assert requests is not None and store.get(f"{key}/{contract.LISTENING}") == b"1"
    p = policy(every=0, join_requests=requests)
    try:
        assert decided(p, 7) is Save.NO
        store.set(f"{key}/{contract.ASKED}", "1")
        assert requests.wait_asked(10.0)
        assert decided(p, 8) is Save.DUE
        assert decided(p, 9) is Save.NO, "one save per request"
        p.on_commit(6, stall_s=0.0, commit_s=0.1)  # an older save: the node still waits
        assert not store.check([f"{key}/{contract.SAVED}"])
        p.on_commit(8, stall_s=0.0, commit_s=0.1)
        assert store.get(f"{key}/{contract.SAVED}") == b"8"
    finally:
        p.close()


def test_the_deadline_is_the_notices_and_at_least_one_second():
    clock = Clock()
    p = policy(clock)
    assert p.agree_on_deadline(Notice("aws", clock.t + 90, "test", clock.t)) == 90
    assert p.agree_on_deadline(Notice("gcp", None, "test", clock.t - 10)) == 20  # 30 s warning
    assert p.agree_on_deadline(Notice("file", clock.t - 5, "late", clock.t - 6)) == 1.0


def learned(clock: Clock) -> SavePolicy:
    p = policy(clock, interval=adaptive(clock, max_steps=500))
    p.resume(restored_step=None, restarted=True)
    for _ in range(5):
        p.observe_step_time(0.25)
    p.on_commit(5, stall_s=0.2, commit_s=0.8)
    clock.t += 600
    return p


def test_state_round_trip_keeps_what_the_interval_learned():
    clock = Clock()
    before = learned(clock)
    state = copy.deepcopy(before.state_dict())
    after = policy(clock, interval=adaptive(clock, max_steps=500))
    after.load_state_dict(state)
    assert after.interval is not None and before.interval is not None
    assert after.interval.state_dict() == before.interval.state_dict()
    assert after.interval.next_interval_steps() == before.interval.next_interval_steps()


def test_only_rank_0_keeps_state_and_any_config_loads_any_state():
    clock = Clock()
    assert policy(clock, interval=adaptive(clock), is_main=False).state_dict() == {}
    fixed = policy(clock, every=10).state_dict()
    assert fixed == {"interval": None}
    fresh = policy(clock, interval=adaptive(clock))
    fresh.load_state_dict(fixed)  # fixed -> adaptive: starts without history
    assert fresh.interval is not None and fresh.interval.checkpoint_cost_s is None
    policy(clock, every=10).load_state_dict(learned(clock).state_dict())  # adaptive -> fixed
    fresh.load_state_dict({"interval": "{not json"})  # reported, not raised
    assert fresh.interval.checkpoint_cost_s is None


def test_the_policy_state_goes_through_a_real_checkpoint(tmp_path):
    clock = Clock()
    before = learned(clock)
    settings = CheckpointConfig(mode="sync")
    with CheckpointManager(tmp_path.as_uri(), settings) as manager:
        assert manager.save(5, {"trainer": {"step": 5}, "policy": before})
    after = policy(clock, interval=adaptive(clock, max_steps=500))
    with CheckpointManager(tmp_path.as_uri(), settings) as manager:
        assert manager.load({"trainer": {"step": 0}, "policy": after}) == 5
    assert after.interval is not None and before.interval is not None
    assert json.dumps(after.interval.state_dict()) == json.dumps(before.interval.state_dict())
