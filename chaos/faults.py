"""Faults as data (`scenario.Fault`), seeded random schedules, and the injector that fires them.

The injector is fed the trainer's metrics records as they arrive and fires each fault when it is
due: an `at_step` fault when the run first reports a step >= at_step; a `during:
checkpoint_upload` fault, once every fault listed before it has fired, at the first checkpoint
upload in flight (its step line has arrived, its commit has not) that began after the fault
before it was over (an outage lasts its seconds); a `during: reform` fault, once every fault
listed before it has fired, when a live node's agent logs that it reached the fault's phase of a
re-form (`LocalCluster.reform_phase`) after the fault before it fired. A wave loses its first
node when it fires and each other one at an offset in [0, within_s] drawn from the run's seed and
the fault's position, so a replay with the same seed spreads the wave the same way. The injector
records what fired, where and when (`Fired`, one per node lost); what each fault cost is worked
out afterwards from the metrics (`report.summarize_faults`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from chaos.metrics import Record, is_step
from chaos.scenario import (
    DEFAULT_NOTICE_S,
    DEFAULT_OUTAGE_S,
    PHASES,
    REMOVES_NODE,
    Fault,
    Scenario,
    check,
)
from elastic_train.events import Event


class Target(Protocol):
    """What the injector acts on (a `LocalCluster` plus the storage proxy)."""

    def live_nodes(self) -> list[int]: ...
    def workers_started_at(self, index: int) -> float | None: ...
    def add_node(self) -> int: ...
    def kill_node(self, index: int) -> float: ...
    def vanish_node(self, index: int) -> float: ...
    def log_offsets(self) -> dict[int, int]: ...
    def reform_phase(self, since: dict[int, int]) -> str | None: ...
    def preempt_node(self, index: int, notice_s: float) -> float: ...
    def kill_worker(self, index: int, local_rank: int = 0) -> int: ...
    def hang_worker(self, index: int, local_rank: int = 0) -> int: ...


LATE_FAULT_ROOM_STEPS = 10
"""Fewest steps a random node added or wave leaves before the end of the run."""


def draw_faults(scenario: Scenario, k: int, seed: int) -> list[Fault]:
    """K faults drawn reproducibly from `seed` (same scenario, k and seed: same faults).

    Steps are distinct, between a few steps in and a few steps before the end; kinds are drawn
    among those possible at that point (no removal below min_nodes or one node, no node beyond
    max_nodes, storage_outage only with s3 or gcs), a wave of two nodes lost (killed or vanished)
    within 0.5-3 s among them when two can go; every fault names its node(s). A node added or a
    wave needs seconds to take effect, so neither is drawn in the last quarter of the run (the
    run could end first, and `faults_observed` would rightly fail it). The result passes
    `scenario.check`."""
    rng = random.Random(seed)
    steps = scenario.steps
    lo, hi = min(3, steps - 1), max(1, steps - 3)
    candidates = list(range(lo, hi + 1)) or [max(0, steps - 1)]
    at_steps = sorted(rng.sample(candidates, min(k, len(candidates))))
    while len(at_steps) < k:
        at_steps.append(at_steps[-1] if at_steps else 0)
    alive = list(range(scenario.nodes))
    created = scenario.nodes
    faults: list[Fault] = []
    for at in at_steps:
        kinds = ["kill_worker", "hang_worker"]
        if len(alive) > max(1, scenario.min_nodes):
            kinds += ["kill_node", "preempt_node", "vanish_node"]
        room = at <= steps - max(LATE_FAULT_ROOM_STEPS, steps // 4)
        if len(alive) - 2 >= max(1, scenario.min_nodes) and room:
            kinds.append("wave")
        if len(alive) < scenario.max_nodes and room:
            kinds.append("add_node")
        if scenario.storage != "file":
            kinds.append("storage_outage")
        kind = rng.choice(kinds)
        if kind == "add_node":
            faults.append(Fault(kind="add_node", at_step=at))
            alive.append(created)
            created += 1
        elif kind == "wave":
            wave = tuple(sorted(rng.sample(alive, 2)))
            faults.append(Fault(kind=rng.choice(["kill_node", "vanish_node"]), at_step=at,
                                node=wave, within_s=round(rng.uniform(0.5, 3.0), 1)))
            alive = [n for n in alive if n not in wave]
        elif kind == "storage_outage":
            faults.append(Fault(kind=kind, at_step=at, seconds=round(rng.uniform(2.0, 5.0), 1)))
        else:
            node = rng.choice(alive)
            notice = float(rng.choice([1, 2, 3])) if kind == "preempt_node" else None
            faults.append(Fault(kind=kind, at_step=at, node=node, notice_s=notice))
            if kind in REMOVES_NODE:
                alive.remove(node)
    check(scenario.with_faults(faults), f"random faults (seed {seed})")
    return faults


@dataclass
class Fired:
    """One fault as it fired."""

    index: int
    """Position in the scenario's fault list."""
    fault: Fault
    node: int | None
    at_step: int | None
    time: float
    """time.time() when it fired (a preempt_node: when the notice was given)."""
    world_before: int
    removed_at: float | None = None
    """preempt_node: time.time() when the node was killed after its notice."""
    detail: dict[str, Any] = field(default_factory=dict)


def changed_no_world(fired: list[Fired]) -> list[bool]:
    """Per fault: it was aimed at a node lost before it ever trained (added, still joining, or
    its first world never started), so no world could show it: the loss itself (`detail["in_world"]`
    False, recorded as it fired) and that node's add_node."""
    never_trained = {f.node for f in fired if f.detail.get("in_world") is False}
    return [f.detail.get("in_world") is False
            or (f.fault.kind == "add_node" and f.node in never_trained) for f in fired]


class Injector:
    """Fires a scenario's faults against `target` as the run's metrics arrive.

    Args:
        faults: the schedule (fired in the order described in the module docstring).
        target: the cluster.
        checkpoint_every: the trainer's checkpoint.every (which steps upload a checkpoint).
        steps: the run's target step (the final save is not a `during` target).
        outage: starts a storage outage of the given seconds without blocking; None when the run
            has no proxy (a storage_outage fault then raises: validation forbids that).
        log: receives one line per fired fault.
        seed: spreads waves (the same seed and schedule: the same offsets).
        clock: wall time (tests inject one); a wave's later losses are due by it.

    A fault whose action raises (e.g. a node with no workers for 30 s, a freeze not observed) is
    recorded with `detail["error"]` and does not stop the injector; the harness's
    `faults_observed` check fails the run for it.
    """

    def __init__(self, faults: list[Fault] | tuple[Fault, ...], target: Target, *,
                 checkpoint_every: int, steps: int,
                 outage: Callable[[float], None] | None = None,
                 log: Callable[[str], None] = print, seed: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.pending: list[tuple[int, Fault]] = list(enumerate(faults))
        self.target = target
        self.every = checkpoint_every
        self.steps = steps
        self.outage = outage
        self.log = log
        self.seed = seed
        self.clock = clock
        self.fired: list[Fired] = []
        self.step = 0
        self.world = 0
        self._committed: set[int] = set()
        self._uploading: int | None = None
        # In the run's own clock (the records' "time"), so that replays are deterministic.
        self._run_time = 0.0
        self._last_start = float("-inf")
        """When the newest world reported `start` (the records' clock)."""
        self._upload_began = 0.0
        self._quiet_until = 0.0
        self.later: list[tuple[float, int, Fault, int, float]] = []
        """A wave's losses still to come: (due by clock, fault index, fault, node, offset_s)."""
        self._mark: dict[int, int] = {}
        self._started_since_mark = False

    @property
    def armed_during(self) -> bool:
        """A `during` fault is next in line, or a wave is under way (poll faster: uploads of a
        tiny model are short, and so are the phases of a re-form)."""
        return bool(self.later) or (bool(self.pending) and self._next_during() is not None)

    def observe(self, records: list[Record]) -> list[Fired]:
        """Take new metrics records and fire every fault now due; returns what fired."""
        for r in records:
            self._run_time = float(r.get("time", self._run_time))
            if is_step(r):
                self.step = int(r["step"])
                self.world = int(r.get("world_size", self.world))
                if self.every and self.step % self.every == 0 and self.step < self.steps:
                    self._uploading = self.step
                    self._upload_began = self._run_time
            elif r.get("event") == Event.START:
                self.world = int(r.get("world_size", self.world))
                self._last_start = float(r.get("time", self._last_start))
                self._uploading = None
                self._started_since_mark = True
            elif r.get("event") in (Event.COMMIT, Event.SAVE_FAILED):
                self._committed.add(int(r["step"]))
                if self._uploading == r.get("step"):
                    self._uploading = None
        fired: list[Fired] = []
        now = self.clock()
        for entry in sorted(e for e in self.later if e[0] <= now):
            self.later.remove(entry)
            _, index, f, node, offset = entry
            fired.append(self._hit(index, f, node, {"wave": index, "wave_offset_s": offset}))
        while True:
            due = self._due()
            if due is None:
                break
            self.pending.remove(due)
            fired.append(self._fire(*due))
        return fired

    def _next_during(self) -> tuple[int, Fault] | None:
        if not self.pending:
            return None
        first_index = min(i for i, _ in self.pending)
        for i, f in self.pending:
            if f.during is not None and i == first_index:
                return i, f
        return None

    def _due(self) -> tuple[int, Fault] | None:
        at = [(i, f) for i, f in self.pending if f.at_step is not None and self.step >= f.at_step]
        if at:
            return min(at, key=lambda p: (p[1].at_step, p[0]))
        during = self._next_during()
        if during is None:
            return None
        if during[1].during == "reform":
            phase = self.target.reform_phase(self._mark)
            wanted = during[1].phase or PHASES[0]
            return during if phase is not None and \
                PHASES.index(phase) >= PHASES.index(wanted) else None
        # An upload that began after the last fault was over: one under way during an outage is
        # the outage's to disturb, not this fault's.
        if (self._uploading is not None and self._uploading not in self._committed
                and self._upload_began > self._quiet_until):
            return during
        return None

    def _pick_nodes(self, f: Fault) -> tuple[int, ...]:
        if f.kind in ("add_node", "storage_outage"):
            return ()
        if f.nodes:
            return f.nodes
        live = self.target.live_nodes()
        return (max(live),) if live else ()

    def _fire(self, index: int, f: Fault) -> Fired:
        """Fire `f` now (a wave: its first node now, the others scheduled in `later`)."""
        nodes = self._pick_nodes(f)
        self._quiet_until = self._run_time + (
            (f.seconds or DEFAULT_OUTAGE_S) if f.kind == "storage_outage" else 0.0)
        detail: dict[str, Any] = {}
        if f.during == "checkpoint_upload":
            detail["upload_step"] = self._uploading
        elif f.during == "reform":
            detail["phase_seen"] = self.target.reform_phase(self._mark)
            # The new world already reported `start`: the phase aimed at was missed.
            detail["after_start"] = self._started_since_mark
        if f.is_wave:
            rng = random.Random(f"{self.seed}:{index}")
            offsets = sorted(round(rng.uniform(0.0, f.within_s or 0.0), 3) for _ in nodes[1:])
            now = self.clock()
            self.later += [(now + off, index, f, node, off)
                           for node, off in zip(nodes[1:], offsets, strict=True)]
            detail.update(wave=index, wave_offset_s=0.0)
        self._mark = self.target.log_offsets()
        self._started_since_mark = False
        return self._hit(index, f, nodes[0] if nodes else None, detail)

    def _hit(self, index: int, f: Fault, node: int | None, detail: dict[str, Any]) -> Fired:
        """Act on one node (or on none) and record it."""
        rec = Fired(index=index, fault=f, node=node, at_step=self.step, time=self.clock(),
                    world_before=self.world, detail=detail)
        if f.kind in REMOVES_NODE and node is not None:
            # A node lost before it ever trained (added and still joining, or its first workers
            # not yet through a world's start) changes no world: what `faults_observed` can ask
            # of the fault depends on this, known only now. A world's `start` comes after every
            # rank's workers started and restored.
            started = self.target.workers_started_at(node)
            rec.detail["in_world"] = started is not None and self._last_start >= started
        try:
            if f.kind == "kill_node":
                rec.time = self.target.kill_node(node)
            elif f.kind == "vanish_node":
                rec.time = self.target.vanish_node(node)
            elif f.kind == "preempt_node":
                rec.time = self.target.preempt_node(node, f.notice_s or DEFAULT_NOTICE_S)
            elif f.kind == "add_node":
                rec.node = self.target.add_node()
            elif f.kind == "kill_worker":
                rec.detail["pid"] = self.target.kill_worker(node)
            elif f.kind == "hang_worker":
                rec.detail["pid"] = self.target.hang_worker(node)
            elif f.kind == "storage_outage":
                if self.outage is None:
                    raise RuntimeError("this run has no storage proxy")
                self.outage(f.seconds or DEFAULT_OUTAGE_S)
        except Exception as e:  # recorded, the run goes on
            rec.detail["error"] = f"{type(e).__name__}: {e}"
        self.fired.append(rec)
        where = f" node {rec.node}" if rec.node is not None else ""
        error = f" FAILED: {rec.detail['error']}" if "error" in rec.detail else ""
        self.log(f"fault {f.kind}{where} fired at step {self.step} (world {self.world}){error}")
        return rec

    def unfired(self) -> list[Fault]:
        """Faults not (wholly) fired: pending ones, and waves with losses still to come."""
        waves = {i: f for _, i, f, _, _ in self.later}
        return [f for _, f in self.pending] + list(waves.values())

    def node_removed(self, node: int, when: float) -> None:
        """Cluster callback: a preempted node was killed at `when`."""
        for rec in self.fired:
            if rec.fault.kind == "preempt_node" and rec.node == node and rec.removed_at is None:
                rec.removed_at = when
