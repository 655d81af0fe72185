"""The `c10d-fast` rendezvous backend: torchrun finds it, its settings take effect, nodes form a
world with it, a bad setting fails with one line, and a joining node is held back while rank 0
saves (never longer than `save_before_join_s`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousTimeoutError
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from elastic_train.join_requests import JoinRequests
from elastic_train.node.contract import (
    JOIN_KEY_ENV,
    PREFORK_SOCKET_ENV,
    RDZV_STORE_ENV,
    world_store,
)
from elastic_train.node.rendezvous import (
    FAST_BACKEND,
    RendezvousSettings,
    expect_first_round,
    host_store,
)


@pytest.fixture(autouse=True)
def _agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler sets its agent's environment for the workers; undo that after each test (set
    first, so that monkeypatch removes what the handler sets: later tests start torchrun)."""
    for name in (RDZV_STORE_ENV, JOIN_KEY_ENV):
        monkeypatch.setenv(name, "")
    # As on every agent (AgentCommand.env): else a node joining a world deadlocks.
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # As torchrun sets for a worker: JoinRequests checks the agent's key against it.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-join")


def _params(port: int, **conf: object) -> RendezvousParameters:
    return RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{port}",
                                run_id="test-fast", min_nodes=2, max_nodes=3,
                                local_addr="127.0.0.1", **conf)


def _conf(settings: RendezvousSettings) -> dict[str, str]:
    return dict(kv.split("=") for kv in settings.conf().split(","))


def test_torchrun_finds_the_fast_backend_and_applies_fractional_settings() -> None:
    store = host_store("127.0.0.1", 0)
    handler = get_rendezvous_handler(_params(store.port, **_conf(RendezvousSettings.fast())))
    assert handler.get_backend() == FAST_BACKEND
    settings = handler.settings
    assert settings.keep_alive_interval == timedelta(seconds=0.5)
    assert settings.keep_alive_max_attempt == 3
    assert settings.timeout.last_call == timedelta(seconds=0.5)
    assert handler._state_holder._cache_duration == 0.1


def test_nodes_form_one_world_on_the_fast_backend() -> None:
    store = host_store("127.0.0.1", 0)
    conf = _conf(RendezvousSettings(last_call_timeout=0.2))
    results: list[tuple[int, int]] = []
    handlers = [get_rendezvous_handler(_params(store.port, **conf)) for _ in range(2)]

    def node(handler) -> None:
        info = handler.next_rendezvous()
        results.append((info.rank, info.world_size))

    threads = [threading.Thread(target=node, args=(h,)) for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for handler in handlers:  # stop their heartbeats before the store goes
        handler.shutdown()
    assert sorted(results) == [(0, 2), (1, 2)]


def test_a_participant_whose_heartbeat_lapsed_makes_the_others_re_form() -> None:
    """A vanished node sends nothing: its peers learn of it from its lapsed keep-alive. Their
    handler then reports a membership change (what torchrun's agent polls while its workers
    are healthy), even though no node waits to join, and never while every node is alive."""
    store = host_store("127.0.0.1", 0)
    conf = _conf(RendezvousSettings(last_call_timeout=0.2, keep_alive_interval=0.2,
                                    keep_alive_max_attempt=3))
    handlers = [get_rendezvous_handler(_params(store.port, **conf)) for _ in range(2)]
    threads = [threading.Thread(target=h.next_rendezvous) for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    survivor, vanished = handlers
    try:
        for _ in range(5):  # several heartbeat periods: all alive, no change
            assert survivor.num_nodes_waiting() == 0 and not survivor.lost_peers()
            time.sleep(0.2)
        vanished._stop_heartbeats()  # frozen: no more keep-alives, no goodbye
        _wait_until(lambda: survivor.num_nodes_waiting() >= 1)
        assert survivor.lost_peers() == {vanished._this_node}
        # A job that is ending (an agent whose workers finished closed the rendezvous) loses
        # nobody: the last node still writing its final weights is not stopped.
        vanished.shutdown()
        _wait_until(lambda: survivor.num_nodes_waiting() == 0)
        assert not survivor.lost_peers()
    finally:
        for handler in handlers:
            handler.shutdown()


def _two_node_world(run_id: str, keep_alive_interval: str) -> tuple[Any, list[Any]]:
    """The store, and two handlers on it that formed a world (min 1, max 2) whose next rounds
    could only complete early: the last call outlasts the join timeout, so a round that waited
    it out would fail the join with a timeout instead of completing."""
    store = host_store("127.0.0.1", 0)
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{store.port}",
                                  run_id=run_id, min_nodes=1, max_nodes=2,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="8",
                                  last_call_timeout="600", first_call_timeout="600",
                                  keep_alive_interval=keep_alive_interval,
                                  keep_alive_max_attempt="3")
    handlers = [get_rendezvous_handler(params) for _ in range(2)]
    threads = [threading.Thread(target=h.next_rendezvous) for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return store, handlers


def test_the_survivors_of_a_lapsed_node_re_form_without_waiting_out_the_last_call() -> None:
    """The survivors of a vanished node know who is left: their round completes once they are
    in."""
    _store, (survivor, vanished) = _two_node_world("test-lapse", keep_alive_interval="0.2")
    try:
        vanished._stop_heartbeats()
        _wait_until(lambda: survivor.num_nodes_waiting() >= 1)
        assert survivor.next_rendezvous().world_size == 1
    finally:
        for handler in (survivor, vanished):
            handler.shutdown()


@pytest.mark.parametrize("fate", ["killed", "frozen"])
def test_the_survivors_of_a_killed_node_re_form_without_waiting_for_its_lapse(fate: str) -> None:
    """A node whose processes died on a machine that still answers refuses connections to its
    liveness port: its peers drop it from the round at once, long before its keep-alive could
    lapse (3 x 20 s here, past the 8 s join timeout), and re-form alone. A frozen node (a
    vanished VM) still answers, or not at all: it is left to its keep-alive, so the join times
    out here, as it must not drop a node that may be alive."""
    _store, (survivor, lost) = _two_node_world(f"test-kill-{fate}", keep_alive_interval="20")
    try:
        lost._stop_heartbeats()
        if fate == "killed":
            lost.liveness.close()
            assert survivor.next_rendezvous().world_size == 1
        else:
            with pytest.raises(RendezvousTimeoutError):
                survivor.next_rendezvous()
            assert lost._this_node in survivor._state_holder.state.participants
    finally:
        for handler in (survivor, lost):
            handler.shutdown()


@pytest.mark.parametrize("seen_by", ["agent's poll", "worker failure"])
def test_a_node_that_leaves_lets_the_others_re_form_at_once(seen_by: str) -> None:
    """A node with a preemption notice leaves: the others see it gone long before its keep-alive
    could lapse (3 x 20 s here, longer than the waits below), re-form alone without waiting out
    the last call, and the rendezvous stays open for them. They see it either in their agent's
    poll, or first as a failed collective (its workers exited), re-forming at once."""
    _store, (survivor, leaver) = _two_node_world(f"test-leave-{seen_by[0]}",
                                                 keep_alive_interval="20")
    try:
        assert survivor.num_nodes_waiting() == 0
        assert leaver.leave()
        if seen_by == "agent's poll":
            _wait_until(lambda: survivor.num_nodes_waiting() >= 1, timeout_s=5)
            assert survivor.lost_peers() == {leaver._this_node}
        else:  # a failure reaches the agent a monitor interval later: its 0.1 s cache is stale
            time.sleep(0.2)
        assert survivor.next_rendezvous().world_size == 1
    finally:
        for handler in (survivor, leaver):
            handler.shutdown()


@pytest.mark.parametrize(("key", "value"), [("poll_interval", "fast"),
                                            ("keep_alive_interval", "0"),
                                            ("last_call_timeout", "-1"),
                                            ("save_before_join_s", "-2"),
                                            ("first_call_timeout", "soon")])
def test_a_bad_setting_fails_with_one_line_naming_it(key: str, value: str) -> None:
    store = host_store("127.0.0.1", 0)
    with pytest.raises(ValueError) as err:
        get_rendezvous_handler(_params(store.port, is_host="false", **{key: value}))
    message = str(err.value)
    assert f"{key}={value!r}" in message and "expected" in message and "\n" not in message


@contextmanager
def _one_node_world(port: int, max_nodes: int = 2, **conf: object) -> Iterator[Any]:
    """A handler that has formed a world of one (min 1), and a second node waiting to join.
    On exit the rendezvous closes, so the waiting node gives up."""
    conf = {"last_call_timeout": "0.1", **conf}
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{port}",
                                  run_id="test-join", min_nodes=1, max_nodes=max_nodes,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="30",
                                  **conf)
    first = get_rendezvous_handler(params)
    first.next_rendezvous()
    second = get_rendezvous_handler(params)
    waiting = threading.Thread(target=lambda: _ignore_errors(second.next_rendezvous))
    waiting.start()
    try:
        _wait_until(lambda: first.num_nodes_waiting() > 0 or first._asked is not None)
        yield first
    finally:
        first.shutdown()  # closes the rendezvous: the waiting node stops waiting
        waiting.join(30)
        second.shutdown()


def _ignore_errors(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the waiting node times out after the test
        pass


def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_joining_node_waits_for_rank_0s_save_then_gets_in() -> None:
    store = host_store("127.0.0.1", 0)
    with _one_node_world(store.port) as first:
        # The agent told its workers where to listen; rank 0 listens there.
        assert os.environ[RDZV_STORE_ENV] == f"127.0.0.1:{store.port}"
        requests = JoinRequests.from_env()
        assert requests is not None
        assert first.num_nodes_waiting() == 0  # held back: rank 0 is asked to save
        _wait_until(lambda: requests.save_now(step=40))
        assert not requests.save_now(step=41)  # one save per request
        requests.on_commit(step=30)  # an older save committing does not count
        assert first.num_nodes_waiting() == 0
        # Rank 0 holds after starting the join's save: not for another step; for this one
        # until it commits (here: never, so the hold ends at its bound and training goes on).
        assert not requests.hold(41, most_s=60)
        assert not requests.hold(40, most_s=0.05)
        requests.on_commit(step=40)
        assert first.num_nodes_waiting() == 1
        assert requests.hold(40, grace_s=0)  # committed: the agents re-form now
        requests.close()


def test_a_joining_node_gets_in_at_once_without_a_listener_or_after_the_wait() -> None:
    store = host_store("127.0.0.1", 0)
    with _one_node_world(store.port, save_before_join_s="30") as first:
        now = 1000.0
        first.clock = lambda: now  # the wait's clock moves only when this test says so
        assert first.num_nodes_waiting() == 1  # nobody listens (e.g. not our trainer)
        requests = JoinRequests.from_env()
        assert requests is not None
        assert first.num_nodes_waiting() == 0  # asked at 1000
        now += 29.9  # the save never commits
        assert first.num_nodes_waiting() == 0, "let in before its wait was over"
        now += 0.2
        assert first.num_nodes_waiting() == 1, "held back after its wait was over"
        requests.close()


def test_a_round_re_formed_for_a_joining_node_completes_once_that_node_is_in() -> None:
    """Room for a third node: torch would wait out the whole last call for it. The round expects
    the world plus the waiting node, and completes as soon as both have joined.

    The last call outlasts the join timeout: a round that waited it out would fail the join with
    a timeout instead of completing. (The first round, a world of one, completes at its short
    first call.)"""
    store = host_store("127.0.0.1", 0)
    with _one_node_world(store.port, max_nodes=3, last_call_timeout="600",
                         first_call_timeout="0.1") as first:
        assert first.num_nodes_waiting() == 1  # no trainer listens: re-form now
        info = first.next_rendezvous()
        assert info.world_size == 2


def test_the_first_round_waits_its_first_call_for_a_node_a_second_late() -> None:
    """A cluster's nodes start together but not within the last call: the job starts with both.

    The first call outlasts the join timeout: a full round that waited it out instead of
    completing at once would fail both joins with a timeout."""
    store = host_store("127.0.0.1", 0)
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{store.port}",
                                  run_id="test-first", min_nodes=1, max_nodes=2,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="30",
                                  last_call_timeout="0.1", first_call_timeout="600")
    first, second = (get_rendezvous_handler(params) for _ in range(2))
    sizes: list[int] = []

    def node(handler) -> None:
        sizes.append(handler.next_rendezvous().world_size)

    threads = [threading.Thread(target=node, args=(h,)) for h in (first, second)]
    threads[0].start()
    # The second node comes once the first has joined, ten of its last calls later.
    _wait_until(lambda: len(first._state_holder.state.participants) == 1)
    time.sleep(1.0)
    threads[1].start()
    for t in threads:
        t.join(60)
    for handler in (first, second):
        handler.shutdown()
    assert sizes == [2, 2], "the first node formed a world of its own"


def test_the_first_round_completes_once_the_nodes_it_was_told_of_have_joined() -> None:
    """Room for a third node that is not coming: told that two start, the first round completes
    when both have joined. Its first call outlasts the join timeout, so a round that waited for
    the third node would fail both joins with a timeout instead."""
    store = host_store("127.0.0.1", 0)
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{store.port}",
                                  run_id="test-told", min_nodes=1, max_nodes=3,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="30",
                                  last_call_timeout="0.1", first_call_timeout="600")
    expect_first_round(store, "test-told", 2)
    handlers = [get_rendezvous_handler(params) for _ in range(2)]
    sizes: list[int] = []
    threads = [threading.Thread(target=lambda h=h: sizes.append(h.next_rendezvous().world_size))
               for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for handler in handlers:
        handler.shutdown()
    assert sizes == [2, 2]


def test_a_node_joining_a_running_world_asks_once_its_workers_can_start_warm(
        tmp_path, monkeypatch, capsys) -> None:
    """Until its prefork server has imported the trainer, a node added to a running world does
    not ask to join: the world would stand still through those imports."""
    store = host_store("127.0.0.1", 0)
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{store.port}",
                                  run_id="test-warm", min_nodes=1, max_nodes=2,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="30",
                                  last_call_timeout="0.1", save_before_join_s="0")
    first = get_rendezvous_handler(params)
    first.next_rendezvous()  # a world of one trains
    server = str(tmp_path / "prefork.sock")
    monkeypatch.setenv(PREFORK_SOCKET_ENV, server)  # the added node's server: still importing
    Path(f"{server}.pids").mkdir()
    second = get_rendezvous_handler(params)
    joining = threading.Thread(target=lambda: _ignore_errors(second.next_rendezvous))
    joining.start()
    log: list[str] = []

    def logged(text: str) -> bool:
        log.append(capsys.readouterr().err)
        return text in "".join(log)

    def waiting() -> set[Any]:
        first._state_holder.sync()
        return first._state_holder.state.wait_list

    try:
        _wait_until(lambda: logged("this node asks to join once its workers can start warm"))
        assert not waiting()
        Path(f"{server}.pids", "preloaded").touch()  # what the server does after its imports
        _wait_until(lambda: len(waiting()) == 1)
        assert logged("asking to join after") and "(warm)" in "".join(log)
    finally:
        first.shutdown()
        joining.join(30)
        second.shutdown()


def test_a_join_that_does_not_complete_says_on_the_log_what_it_waits_for(capsys) -> None:
    """torch logs nothing while a join waits: a round that never completes must leave the
    state it waited in on the node's log. Here one node waits for a second that never comes."""
    store = host_store("127.0.0.1", 0)
    params = RendezvousParameters(backend=FAST_BACKEND, endpoint=f"127.0.0.1:{store.port}",
                                  run_id="test-stuck", min_nodes=2, max_nodes=3,
                                  local_addr="127.0.0.1", is_host="false", join_timeout="1",
                                  last_call_timeout="0.1")
    handler = get_rendezvous_handler(params)
    handler._op_executor.report_every_s = 0.0  # every poll: the test needs no clock
    with pytest.raises(RendezvousTimeoutError):
        handler.next_rendezvous()
    handler.shutdown()
    err = capsys.readouterr().err
    assert "c10d-fast: not joined after" in err
    assert "round 0 open; 1 participant(s) (min 2, expected unsaid)" in err
    assert "waiting: -; no last call; keep-alive ages: 127.0.0.1_" in err


def test_a_worker_ignores_join_variables_left_over_from_another_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchrun started from a process that once hosted a handler inherits its variables; its
    workers must not take a dead store for their world's."""
    monkeypatch.setenv(RDZV_STORE_ENV, "127.0.0.1:9")
    monkeypatch.setenv(JOIN_KEY_ENV, "elastic_train/join/an-old-run/3")
    assert world_store() is None and JoinRequests.from_env() is None
    monkeypatch.setenv(JOIN_KEY_ENV, "elastic_train/join/test-join/3")
    assert world_store() == ("127.0.0.1:9", "elastic_train/join/test-join/3")


def test_the_standalone_store_listens_on_its_host_alone() -> None:
    """The store has no authentication: it must not listen on every interface (torch's own
    TCPStore does, whatever host it is given)."""
    import psutil

    store = host_store("127.0.0.1", 0)
    listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    store.set("k", "v")
    assert store.get("k") == b"v"
