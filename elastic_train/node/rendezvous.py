"""How elastic nodes rendezvous: the settings, found by measuring torch 2.13's rendezvous and
proved by the chaos harness, in one place for the local cluster (`chaos.cluster`) and for real
nodes (`elastic_train.node.launch`); figures in docs/benchmarks.md.

torchrun's c10d rendezvous polls its shared state once a second (`_delay(seconds=1)` in the join
loop, and a 1 s state cache) and takes its timeouts in whole seconds, so every re-form costs
several one-second quanta on top of the time to notice a dead node. `--rdzv-backend=c10d-fast` is
the same c10d rendezvous (same store, same state, same protocol) with a configurable poll interval
and fractional timeouts; torchrun finds it through the `torchrun.handlers` entry point.

It also saves before a node joins. torchrun re-forms the world as soon as a node waits to join,
and every worker resumes from the newest commit, so all work since that commit would be lost.
Instead, an agent that sees a node waiting asks the current world's rank 0 (`JoinRequests`,
through keys in the rendezvous store) to save, and lets the node in once that save has committed,
or after `save_before_join_s` (default 10 s; 0 turns this off), or at once when no trainer
listens. And a node that joins a running world asks to join only once its prefork server has
imported the trainer (at most a minute): the others train through those imports instead of
standing still for them. A job's first round does not wait (its nodes import side by side).

A round re-formed for a joining node completes as soon as every node it expects has joined,
not a last call later: the agents that let the node in write how many nodes the next round
expects (the world plus the waiting nodes) into the store, and the node whose joining makes the
count complete marks the round complete. A re-form for nodes whose keep-alive lapsed (below) or
that left (a node with a preemption notice leaves the rendezvous as it goes: `leave`) expects the
survivors in the same way, whether their agents see it in their poll or through their workers'
failed collective. A node whose agent died on a machine that still answers (a
process killed, a container evicted: its sockets are reset) is not left to lapse: every agent
listens on a port of its own while its process lives (`_Liveness`), and an agent whose workers
failed tries to connect to each peer of its world that is still a participant. A refused
connection means that peer's agent is gone: the agent marks its keep-alive as lapsed long ago
(torch then drops it from the round, as for a lapse) and the next round expects the survivors.
A peer that answers, or does not answer within `probe_timeout` (a frozen or vanished machine),
is left to its keep-alive. Any other re-form waits out the last call as torch does: nobody knows
yet how many nodes are still alive.

A node lost without a word (a reclaimed VM resets no socket) is found by its heartbeats: torch
drops a participant whose keep-alive lapsed from the shared state, and this handler then tells
its agent that the world's membership changed (`num_nodes_waiting` > 0), so the agent stops its
workers, which would otherwise block in a collective until it timed out, and re-forms at once
without spending a restart. The same holds for a participant that left to rejoin, or when this
node itself was dropped (the others formed a world without it)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any

from elastic_train.node import contract, prefork

if TYPE_CHECKING:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

FAST_BACKEND = "c10d-fast"
"""The `--rdzv-backend` name of `create_fast_handler` (registered in pyproject.toml)."""
ASKING_TO_JOIN = "c10d-fast: asking to join"
"""What a node's log says when it asks to join a running world after waiting for its imports."""


@dataclass(frozen=True)
class RendezvousSettings:
    """torchrun rendezvous settings. `fast()` is what the harness uses; `torch_default()` is
    torch's own c10d rendezvous with its defaults (tens of seconds to re-form after a node is lost
    or added: docs/benchmarks.md)."""

    backend: str = FAST_BACKEND
    poll_interval: float | None = 0.1
    """Seconds between polls of the shared state while a node waits to (re)join (torch: 1 s)."""
    last_call_timeout: float | None = 0.5
    """Seconds the rendezvous waits for more nodes once min_nodes have joined. Default 30: every
    re-form after a membership change waited that long. It must cover the spread between the
    survivors of a fault rejoining (they learn of it within the same collective)."""
    first_call_timeout: float | None = None
    """The last call of the job's first round (None: last_call_timeout). A cluster's nodes start
    together, but not within a second: with a longer first call the job starts with all of them
    (the round completes at once when max_nodes have joined) instead of growing soon after."""
    keep_alive_interval: float | None = 0.5
    """Seconds between an agent's heartbeats in the store. Default 5."""
    keep_alive_max_attempt: int | None = 3
    """Missed heartbeats before a node counts as dead: 0.5 s x 3 notices a lost node in 1-1.5 s.
    Do not use 2 (measured with 1 s heartbeats: it split one job into two worlds)."""
    join_timeout: int | None = 120
    """Seconds a node waits for a rendezvous to complete before its agent gives up (default 600):
    bounds how long a node outlives a job that finished without it."""
    save_before_join_s: float | None = None
    """Longest a joining node waits for rank 0's save (None: the handler's 10 s; 0: no save, the
    grown world resumes from the newest commit)."""
    probe_timeout: float | None = 0.25
    """Seconds an agent whose workers failed waits for each peer's liveness port to answer or
    refuse (default 0.25; 0: no probe, a dead peer is found by its lapse). Only a refusal
    counts: a peer that does not answer in time is left to its keep-alive."""
    read_timeout: int | None = 10
    """Whole seconds any one operation of an agent on the rendezvous store may take (torch: 60).
    Only a store that stopped answering (its node vanished) takes this long: the agent then
    fails, and its node exits with a code SkyPilot recovers on, instead of hanging a minute."""

    @classmethod
    def fast(cls) -> RendezvousSettings:
        return cls()

    @classmethod
    def torch_default(cls) -> RendezvousSettings:
        return cls("c10d", **{f.name: None for f in fields(cls) if f.name != "backend"})

    def conf(self) -> str:
        # is_host=false: no agent hosts the c10d store; our standalone store process does, so any
        # agent may die without taking the rendezvous (and the job) down with it.
        parts = ["is_host=false"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "backend" and value is not None:
                parts.append(f"{f.name}={value:g}")
        return ",".join(parts)

    def torchrun_args(self, endpoint: str, run_id: str) -> list[str]:
        return [f"--rdzv-backend={self.backend}", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={run_id}", f"--rdzv-conf={self.conf()}"]


def create_fast_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's c10d rendezvous handler with `poll_interval` and fractional timeouts (see the
    module docstring). A bad value fails torchrun at start with a one-line ValueError.

    It reaches private names of torch 2.13's dynamic rendezvous: the state holder (to pass its
    cache duration), the join loop's `_delay` (to shorten its one-second poll) and the operation
    executor (to complete a round early, or give the first one longer);
    tests/test_rendezvous.py fails if a torch upgrade moves any of them."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dyn

    poll_s = _seconds(params, "poll_interval", 0.1)
    timeout = dyn.RendezvousTimeout(
        join=timedelta(seconds=_seconds(params, "join_timeout", 600)),
        last_call=timedelta(seconds=_seconds(params, "last_call_timeout", 30)),
        close=timedelta(seconds=_seconds(params, "close_timeout", 30)),
        heartbeat=timedelta(seconds=_seconds(params, "heartbeat_timeout", 5)),
    )
    settings = dyn.RendezvousSettings(
        params.run_id, params.min_nodes, params.max_nodes, timeout,
        keep_alive_interval=timedelta(seconds=_seconds(params, "keep_alive_interval", 5)),
        keep_alive_max_attempt=int(_seconds(params, "keep_alive_max_attempt", 3, "a count")),
    )
    save_before_join_s = _seconds(params, "save_before_join_s", 10, zero_ok=True)
    first_call = timedelta(seconds=_seconds(params, "first_call_timeout",
                                            timeout.last_call.total_seconds()))
    backend, store = c10d_rendezvous_backend.create_backend(params)
    state_holder = dyn._BackendRendezvousStateHolder(backend, settings, cache_duration=poll_s)
    _poll_every(dyn, poll_s)
    node = dyn.DynamicRendezvousHandler._node_desc_generator.generate(params.local_addr)
    handler = _handler_class()(node, settings, FAST_BACKEND, store, state_holder)
    handler.endpoint, handler.save_before_join_s = params.endpoint, save_before_join_s
    handler.probe_timeout = _seconds(params, "probe_timeout", 0.25, zero_ok=True)
    if handler.probe_timeout > 0:
        handler.liveness = _Liveness.publish(store, params.run_id, node, params.endpoint)
    handler._op_executor = _executor_class()(node, state_holder, settings, store, first_call)
    return handler


@functools.cache
def _handler_class() -> type[Any]:
    """torch's handler, saving before a node joins (see the module docstring). Made on first
    use so that importing this module does not import torch."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    class SaveBeforeJoinHandler(DynamicRendezvousHandler):
        endpoint = ""
        save_before_join_s = 10.0
        clock: Callable[[], float] = staticmethod(time.monotonic)
        """Seconds, for the save's wait; a test holds it still to see both sides of the wait."""
        _asked: tuple[str, float] | None = None
        probe_timeout = 0.0
        liveness: _Liveness | None = None
        warm_join_wait_s = 60.0
        """Longest a node joining a running world waits for its prefork server's imports."""

        _formed: tuple[int, frozenset[Any]] | None = None
        """(round, participants) of the world this agent's workers run in."""

        def next_rendezvous(self) -> Any:
            if self._formed is None:
                self._warm_before_joining()
            self._expect_survivors()
            info = super().next_rendezvous()
            state = self._state_holder.state  # as the round completed: the world of `info`
            self._formed = (state.round, frozenset(state.participants))
            # A heartbeat now: torch's next one comes a keep-alive interval after the round
            # completed, and the last one of its join loop may be that old already; on a busy
            # node the gap outgrew the lapse, and the others dropped this node from the world
            # it had just joined.
            self._keep_alive()
            # Inherited by the workers this agent starts next: where to hear join requests.
            os.environ[contract.RDZV_STORE_ENV] = self.endpoint
            os.environ[contract.JOIN_KEY_ENV] = contract.round_key(self._settings.run_id,
                                                 state.round)
            return info

        def num_nodes_waiting(self) -> int:
            """What torchrun's agent polls, every monitor interval while its workers are
            healthy, to decide whether to re-form now (> 0) without spending a restart.

            At least 1 when a node of this world is gone from the rendezvous: its keep-alive
            lapsed (torch's sync then drops it: a vanished VM, which resets no socket, so the
            workers here would block in a collective until it times out), or it left to rejoin.
            Else the nodes waiting to join, but 0 (hold them back) while this world's rank 0
            saves for them. A store error lets a waiting node in."""
            waiting = super().num_nodes_waiting()
            if lost := self.lost_peers():
                state = self._state_holder.state
                print(f"c10d-fast: re-forming: {len(lost)} node(s) of round {self._formed[0]} "
                      f"gone (keep-alive lapsed, or left to rejoin): "
                      f"{', '.join(sorted(str(n) for n in lost))}; now round {state.round}, "
                      f"{len(state.participants)} participant(s), {waiting} waiting",
                      file=sys.stderr, flush=True)
                if state.round == self._formed[0] and state.complete and \
                        self._this_node in state.participants:
                    # The survivors still hold this round: the next one expects them alone.
                    self._expect_next_round(state, waiting)
                return max(waiting, 1)
            if waiting == 0 or self._holds_back():
                return 0
            state = self._state_holder.state
            if state.complete:  # this agent re-forms now: tell the next round whom to expect
                self._expect_next_round(state, waiting)
            return waiting

        def _warm_before_joining(self) -> None:
            """A node that joins a world already training (a node added, or one that came
            back) asks to join only once its prefork server has imported the trainer (at most
            `warm_join_wait_s`): the world stands still from the save for it until its first
            step, and its workers' imports are seconds that the others can go on training
            through instead. A job's first round does not wait: its nodes start together and
            import side by side."""
            socket_path = os.environ.get(contract.PREFORK_SOCKET_ENV, "")
            if not socket_path or self.warm_join_wait_s <= 0 or prefork.preloaded(socket_path):
                return
            try:
                self._state_holder.sync()
            except Exception:  # noqa: BLE001 - the join then finds the store trouble itself
                return
            state = self._state_holder.state
            if state.round == 0 and not state.complete:
                return
            started = time.monotonic()
            _log("c10d-fast: a world is training; this node asks to join once its workers "
                 f"can start warm (at most {self.warm_join_wait_s:g} s)")
            while not prefork.preloaded(socket_path) and \
                    time.monotonic() - started < self.warm_join_wait_s:
                time.sleep(0.05)
            _log(f"{ASKING_TO_JOIN} after {time.monotonic() - started:.2f} s "
                 f"({'warm' if prefork.preloaded(socket_path) else 'the imports go on'})")

        def _expect_survivors(self) -> None:
            """Re-forming after a failure (this node's workers failed): if nodes of this world
            have left (a noticed preemption) or lapsed, the next round expects those still here
            and those waiting, as when the loss is seen first through the heartbeats."""
            if self._formed is None:
                return
            try:
                self._state_holder.sync()
            except Exception:  # noqa: BLE001 - the round then waits out its last call
                return
            self._drop_dead_peers()
            state = self._state_holder.state
            if state.round == self._formed[0] and state.complete and \
                    self._this_node in state.participants and self.lost_peers():
                self._expect_next_round(state, len(state.wait_list))

        def _drop_dead_peers(self) -> None:
            """Peers of this world, still participants of its round, whose liveness port
            refuses a connection (their agent is gone): mark their keep-alive as lapsed long
            ago, so that every agent's next sync drops them from the round as torch drops a
            lapsed node. Store trouble leaves them to their own lapse."""
            assert self._formed is not None
            if self.probe_timeout <= 0:
                return
            state = self._state_holder.state
            peers = [n for n in self._formed[1]
                     if n != self._this_node and n in state.participants]
            if not peers:
                return
            with ThreadPoolExecutor(len(peers), thread_name_prefix="c10d-probe") as pool:
                answers = list(pool.map(self._answers, peers))
            dead = {n for n, answered in zip(peers, answers, strict=True) if answered is False}
            if not dead:
                return
            try:
                for _ in range(5):  # a lost compare-and-set reloads the state: mark it again
                    state = self._state_holder.state
                    marked = [n for n in dead if n in state.last_heartbeats]
                    if not marked:
                        break
                    for n in marked:
                        state.last_heartbeats[n] = _LONG_AGO
                    self._state_holder.mark_dirty()
                    self._state_holder.sync()
            except Exception:  # noqa: BLE001 - their keep-alives lapse instead
                return
            _log(f"c10d-fast: re-forming: {len(dead)} node(s) of round {self._formed[0]} "
                 f"refused a connection (their agent is gone): "
                 f"{', '.join(sorted(str(n) for n in dead))}")

        def _answers(self, node: Any) -> bool | None:
            """Whether `node`'s agent process is alive: True if its liveness port accepted a
            connection, False if it refused one, None if unknown (no port published, no answer
            within `probe_timeout`, the store or the network failed)."""
            key = _liveness_key(self._settings.run_id, node)
            try:
                if not self._store.check([key]):
                    return None
                host, port = self._store.get(key).decode().rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=self.probe_timeout):
                    return True
            except ConnectionRefusedError:
                return False
            except Exception:  # noqa: BLE001 - unknown: the keep-alive decides
                return None

        def _expect_next_round(self, state: Any, waiting: int) -> None:
            """Let the next round complete once this round's participants and the nodes
            waiting have joined, instead of after its whole last call. The first count written
            wins: a later agent may see fewer participants (a survivor already left the round
            to rejoin), which must not replace a fuller count. A count too low costs one more
            re-form (a node left out joins right after); too high (a node lost meanwhile), the
            last call, as without this."""
            expected = min(len(state.participants) + waiting, self._settings.max_nodes)
            try:
                self._store.compare_set(_expected_key(self._settings.run_id, state.round + 1),
                                        "", str(expected))
            except Exception:  # noqa: BLE001 - the round then waits out its last call
                pass

        def leave(self) -> bool:
            """This node goes for good (a preemption notice; its state is saved): it stops its
            heartbeats and leaves the round's participants now, so that the others re-form at
            once instead of after its keep-alive lapses (they see it gone, and expect only
            themselves in the next round). The rendezvous stays open for them. Returns False,
            printing why, when the store refused: the lapse then does the same, later."""
            from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dyn

            self._stop_heartbeats()
            try:
                self._op_executor.run(dyn._RendezvousExitOp(),
                                      self._get_deadline(self._settings.timeout.close))
            except Exception as e:  # noqa: BLE001 - the others find the lapse instead
                print(f"c10d-fast: could not leave the rendezvous ({type(e).__name__}: {e}); "
                      "the others will find this node's keep-alive lapsed", file=sys.stderr,
                      flush=True)
                return False
            print("c10d-fast: left the rendezvous (this node goes)", file=sys.stderr,
                  flush=True)
            return True

        def lost_peers(self) -> frozenset[Any]:
            """Nodes of the world this agent formed that are no longer participants of its
            round (as of the last sync, which drops a node whose keep-alive lapsed)."""
            if self._formed is None:
                return frozenset()
            round_, formed = self._formed
            state = self._state_holder.state
            if state.closed:  # the job is ending: an agent whose workers finished has left
                return frozenset()
            if state.round != round_:  # every node left that round: all must re-form
                return formed
            return formed - frozenset(state.participants)

        def _holds_back(self) -> bool:
            key = os.environ.get(contract.JOIN_KEY_ENV, "")
            if self.save_before_join_s <= 0 or not key:
                return False
            try:
                if not self._store.check([f"{key}/{contract.LISTENING}"]):
                    return False
                if self._asked is None or self._asked[0] != key:
                    self._store.set(f"{key}/{contract.ASKED}", "1")
                    self._asked = (key, self.clock())
                    _log(f"c10d-fast: a node waits to join; asked rank 0 to save first "
                         f"(at most {self.save_before_join_s:g} s)")
                if self._store.check([f"{key}/{contract.SAVED}"]):
                    _log(f"c10d-fast: the save for the joining node committed after "
                         f"{self.clock() - self._asked[1]:.2f} s; re-forming")
                    return False
            except Exception:  # noqa: BLE001 - any store trouble: re-form as torch would
                return False
            if self.clock() - self._asked[1] < self.save_before_join_s:
                return True
            _log(f"c10d-fast: no save committed within {self.save_before_join_s:g} s; "
                 "letting the waiting node in")
            return False

    return SaveBeforeJoinHandler


def _log(message: str) -> None:
    """One line in the node's log, in the form of torchrun's own (`I1207 07:52:18.403000 PID
    ...`): the join's steps line up with the agent's, and one parser reads both."""
    print(f"I{datetime.now().strftime('%m%d %H:%M:%S.%f')} {os.getpid()} {message}",
          file=sys.stderr, flush=True)


@functools.cache
def _executor_class() -> type[Any]:
    """torch's rendezvous operations, completing a round once every expected node has joined
    (see the module docstring). Made on first use, like the handler."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dyn

    class CompleteWhenExpectedExecutor(dyn._DistributedRendezvousOpExecutor):
        report_every_s = 10.0
        """A join that has not completed after this long says so on the node's log, with the
        shared state as this node sees it, and again as often: torch logs nothing at INFO
        while it waits, and a round that never completes must leave a trace to debug."""
        clock: Callable[[], float] = staticmethod(time.monotonic)

        def __init__(self, node: Any, state_holder: Any, settings: Any, store: Any,
                     first_call: timedelta) -> None:
            super().__init__(node, state_holder, settings)
            self._store = store
            self._first_call = first_call

        def run(self, state_handler: Callable[[Any, float], Any], deadline: float,
                update_deadline: Callable[[timedelta], float] | None = None) -> None:
            if not isinstance(state_handler, dyn._RendezvousJoinOp):
                return super().run(state_handler, deadline, update_deadline)
            started = self.clock()
            report_at = started + self.report_every_s

            def join(ctx: Any, deadline_: float) -> Any:
                nonlocal report_at
                now = self.clock()
                if now >= report_at:
                    report_at = now + self.report_every_s
                    _log(f"c10d-fast: not joined after {now - started:.1f} s: "
                         f"{self._describe(ctx.state)}")
                return state_handler(ctx, deadline_)

            return super().run(join, deadline, update_deadline)

        def _describe(self, state: Any) -> str:
            now = datetime.now(timezone.utc)
            expected = self._expected(state.round)
            last_call = ("no last call" if state.deadline is None else
                         f"last call ends in {(state.deadline - now).total_seconds():.1f} s")
            ages = ", ".join(f"{n} {(now - t).total_seconds():.1f} s"
                             for n, t in sorted(state.last_heartbeats.items(), key=str))
            return (f"round {state.round} {'complete' if state.complete else 'open'}"
                    f"{', closed' if state.closed else ''}; "
                    f"{len(state.participants)} participant(s) (min {self._settings.min_nodes}, "
                    f"expected {expected if expected <= self._settings.max_nodes else 'unsaid'})"
                    f": {', '.join(sorted(map(str, state.participants))) or '-'}; "
                    f"waiting: {', '.join(sorted(map(str, state.wait_list))) or '-'}; "
                    f"{last_call}; keep-alive ages: {ages or '-'}")

        def _add_to_participants(self) -> None:
            super()._add_to_participants()
            state = self._state
            if state.complete:
                return
            joined = len(state.participants)
            if state.round == 0 and joined == self._settings.min_nodes:
                state.deadline = datetime.now(timezone.utc) + self._first_call
            if joined >= max(self._settings.min_nodes, self._expected(state.round)):
                self._mark_rendezvous_complete()

        def _expected(self, round_: int) -> int:
            """Nodes round `round_` expects; more than can join when nobody said."""
            key = _expected_key(self._settings.run_id, round_)
            try:
                if self._store.check([key]):
                    return int(self._store.get(key))
            except Exception:  # noqa: BLE001 - store trouble: wait out the last call
                pass
            return self._settings.max_nodes + 1

    return CompleteWhenExpectedExecutor


_LONG_AGO = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""The keep-alive given to a peer found dead: older than any lapse, so torch drops it."""


class _Liveness:
    """A TCP port that answers for as long as this agent process lives: the kernel refuses
    connections to it once the process is gone (while the machine still answers), which is
    how the other agents tell a dead peer from a slow one without waiting for its keep-alive
    to lapse. A daemon thread accepts and closes each connection; nothing is read or sent. It
    listens on the address this node reaches the rendezvous store from (the private network the
    nodes share); its host:port is published in the store under `_liveness_key`."""

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, 0), backlog=64)
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="c10d-liveness", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            connection.close()

    def close(self) -> None:
        """Stop answering, as a dead process would: connections are refused from now on."""
        # shutdown first: a close alone leaves the socket listening while accept() holds it.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    @classmethod
    def publish(cls, store: Any, run_id: str, node: Any, endpoint: str) -> _Liveness | None:
        """Open one and publish it for `node`; None (peers then wait for this node's lapse, as
        without the probe) if the address or the store fails."""
        try:
            liveness = cls(_address_towards(endpoint))
            store.set(_liveness_key(run_id, node), liveness.address)
        except Exception as e:  # noqa: BLE001 - the lapse still finds this node
            _log(f"c10d-fast: no liveness port ({type(e).__name__}: {e}); a lost node is "
                 "found by its keep-alive alone")
            return None
        return liveness


def _address_towards(endpoint: str) -> str:
    """This machine's address on the route to `endpoint` (host:port): a UDP socket's connect
    sends nothing, it only picks the interface."""
    host, port = endpoint.rsplit(":", 1)
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), int(port or 0),
                                                  type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as route:
        route.connect(address)
        return route.getsockname()[0]


def _liveness_key(run_id: str, node: Any) -> str:
    return f"elastic_train/alive/{run_id}/{node}"


def expect_first_round(store: TCPStore, run_id: str, nodes: int) -> None:
    """Tell job `run_id`'s first round how many nodes start together: it completes as soon as
    that many have joined rather than at the end of its first call (which is then only the wait
    for a node that fails to start). Whoever starts the nodes knows the count; the first writer
    wins. Raises what the store raises when it cannot be reached."""
    store.compare_set(_expected_key(run_id, 0), "", str(nodes))


def _expected_key(run_id: str, round_: int) -> str:
    return f"{contract.round_key(run_id, round_)}/{contract.EXPECTED}"


def torchrun_handler() -> object:
    """The `torchrun.handlers` entry point: torchrun calls this and registers what it returns."""
    return create_fast_handler


def _seconds(params: RendezvousParameters, key: str, default: float,
             what: str = "a number of seconds", zero_ok: bool = False) -> float:
    raw = params.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"--rdzv-conf {key}={raw!r}: expected {what} {'>=' if zero_ok else '>'} 0")
    return value


def _poll_every(dyn: ModuleType, poll_s: float) -> None:
    """Make the join loop's one-second state poll take `poll_s`; other delays are unchanged."""
    original = dyn._delay
    original = getattr(original, "__wrapped_delay__", original)

    def delay(seconds: float | tuple[float, float]) -> None:
        original(poll_s if seconds == 1 else seconds)

    delay.__wrapped_delay__ = original  # type: ignore[attr-defined]
    dyn._delay = delay


def host_store(host: str, port: int) -> TCPStore:
    """The standalone c10d store that agents started with `is_host=false` rendezvous on. It lives
    as long as the returned object (keep a reference); port 0 picks a free one (`.port`).

    It listens on `host` alone: torch's store, given a host, still listens on every interface,
    and it has no authentication, so on a node with a public address anyone could join the
    rendezvous. We bind the listening socket ourselves and hand torch its descriptor. Raises
    OSError when `host` is not an address of this machine or the port is taken."""
    import socket

    from torch.distributed import TCPStore

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.create_server(address, family=family, backlog=1024)
    bound_port = listener.getsockname()[1]
    # detach(): the store owns the descriptor from here on; Python must not close it.
    # wait_for_workers=False: the store must not block for a number of clients; nodes come and go.
    return TCPStore(host, bound_port, is_master=True, wait_for_workers=False,
                    master_listen_fd=listener.detach())
