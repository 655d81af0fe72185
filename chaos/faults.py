"""Faults as data (`scenario.Fault`), seeded random schedules, and the injector that fires them.

The injector is fed the trainer's metrics records as they arrive and fires each fault when it is
due: an `at_step` fault when the run first reports a step >= at_step; a `during:
checkpoint_upload` fault, once every fault listed before it has fired, at the first checkpoint
upload in flight (its step line has arrived, its commit has not) that began after the fault
before it was over (an outage lasts its seconds). It records
what fired, where and when (`Fired`); what each fault cost is worked out afterwards from the
metrics (`report.summarize_faults`).
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
    REMOVES_NODE,
    Fault,
    Scenario,
    check,
)
from elastic_train.events import Event


class Target(Protocol):
    """What the injector acts on (a `LocalCluster` plus the storage proxy)."""

    def live_nodes(self) -> list[int]: ...
    def add_node(self) -> int: ...
    def kill_node(self, index: int) -> float: ...
    def preempt_node(self, index: int, notice_s: float) -> float: ...
    def kill_worker(self, index: int, local_rank: int = 0) -> int: ...
    def hang_worker(self, index: int, local_rank: int = 0) -> int: ...


def draw_faults(scenario: Scenario, k: int, seed: int) -> list[Fault]:
    """K faults drawn reproducibly from `seed` (same scenario, k and seed: same faults).

    Steps are distinct, between a few steps in and a few steps before the end; kinds are drawn
    among those possible at that point (no removal below min_nodes or one node, no node beyond
    max_nodes, storage_outage only with s3 or gcs); every fault names its node. The result
    passes `scenario.check`."""
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
            kinds += ["kill_node", "preempt_node"]
        if len(alive) < scenario.max_nodes:
            kinds.append("add_node")
        if scenario.storage != "file":
            kinds.append("storage_outage")
        kind = rng.choice(kinds)
        if kind == "add_node":
            faults.append(Fault(kind="add_node", at_step=at))
            alive.append(created)
            created += 1
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

    A fault whose action raises (e.g. a node with no workers for 30 s) is recorded with
    `detail["error"]` and does not stop the injector.
    """

    def __init__(self, faults: list[Fault] | tuple[Fault, ...], target: Target, *,
                 checkpoint_every: int, steps: int,
                 outage: Callable[[float], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.pending: list[tuple[int, Fault]] = list(enumerate(faults))
        self.target = target
        self.every = checkpoint_every
        self.steps = steps
        self.outage = outage
        self.log = log
        self.fired: list[Fired] = []
        self.step = 0
        self.world = 0
        self._committed: set[int] = set()
        self._uploading: int | None = None
        # In the run's own clock (the records' "time"), so that replays are deterministic.
        self._run_time = 0.0
        self._upload_began = 0.0
        self._quiet_until = 0.0

    @property
    def armed_during(self) -> bool:
        """A `during` fault is next in line (poll faster: uploads of a tiny model are short)."""
        return bool(self.pending) and self._next_during() is not None

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
                self._uploading = None
            elif r.get("event") in (Event.COMMIT, Event.SAVE_FAILED):
                self._committed.add(int(r["step"]))
                if self._uploading == r.get("step"):
                    self._uploading = None
        fired: list[Fired] = []
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
        # An upload that began after the last fault was over: one under way during an outage is
        # the outage's to disturb, not this fault's.
        if (during and self._uploading is not None and self._uploading not in self._committed
                and self._upload_began > self._quiet_until):
            return during
        return None

    def _pick_node(self, f: Fault) -> int | None:
        if f.kind in ("add_node", "storage_outage"):
            return None
        if f.node is not None:
            return f.node
        live = self.target.live_nodes()
        return max(live) if live else None

    def _fire(self, index: int, f: Fault) -> Fired:
        node = self._pick_node(f)
        rec = Fired(index=index, fault=f, node=node, at_step=self.step, time=time.time(),
                    world_before=self.world)
        self._quiet_until = self._run_time + (
            (f.seconds or DEFAULT_OUTAGE_S) if f.kind == "storage_outage" else 0.0)
        if f.during is not None:
            rec.detail["upload_step"] = self._uploading
        try:
            if f.kind == "kill_node":
                rec.time = self.target.kill_node(node)
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

    def node_removed(self, node: int, when: float) -> None:
        """Cluster callback: a preempted node was killed at `when`."""
        for rec in self.fired:
            if rec.fault.kind == "preempt_node" and rec.node == node and rec.removed_at is None:
                rec.removed_at = when
