"""Chaos harness pieces that need no cluster: scenarios, random faults, lineage, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from chaos import invariants, report
from chaos.faults import Fired, Injector, draw_faults
from chaos.metrics import Lineage, MetricsTail
from chaos.scenario import CONTRACTS, Fault, ScenarioError, from_dict, load
from elastic_train.events import Event

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "chaos" / "scenarios"

BASE = {"name": "t", "nodes": 2, "min_nodes": 1, "max_nodes": 3, "storage": "s3",
        "train": {"model": "tiny", "steps": 40, "checkpoint.every": 5}}


def scenario(**changes):
    return from_dict({**BASE, **changes})


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_validate(path: Path) -> None:
    s = load(path)
    jsonschema.validate(s.to_dict(), json.loads((CONTRACTS / "scenario.schema.json").read_text()))


def test_demo_has_every_fault_the_issue_asks_for() -> None:
    kinds = {f.kind for f in load(SCENARIOS / "demo.yaml").faults}
    assert {"kill_node", "preempt_node", "add_node", "kill_worker", "storage_outage"} <= kinds


@pytest.mark.parametrize(("changes", "message"), [
    ({"nodes": 0}, "nodes: 0 is less than the minimum of 1"),
    ({"storage": "nfs"}, "storage: 'nfs' is not one of"),
    ({"bogus": 1}, "scenario: unknown key 'bogus'"),
    ({"min_node": 1}, "unknown key 'min_node' (did you mean 'min_nodes'?)"),
    ({"faults": [{"kind": "explode", "at_step": 3}]},
     "faults.0: fault kind 'explode' is not one this harness runs"),
    ({"faults": [{"kind": "kill_node", "at_step": 3, "notice": 2}]},
     "faults.0: unknown key 'notice' (did you mean 'notice_s'?)"),
    ({"faults": [{"kind": "kill_node"}]}, "a fault needs exactly one of at_step or during"),
    ({"faults": [{"kind": "kill_node", "at_step": 3, "during": "checkpoint_upload"}]},
     "a fault needs exactly one of at_step or during"),
    ({"faults": [{"kind": "kill_node", "at_step": 3, "node": 5}]}, "node 5 does not exist yet"),
    ({"faults": [{"kind": "kill_node", "at_step": 3, "node": 1},
                 {"kind": "kill_worker", "at_step": 5, "node": 1}]}, "node 1 was already removed"),
    ({"faults": [{"kind": "kill_node", "at_step": 3, "node": 1},
                 {"kind": "kill_node", "at_step": 5, "node": 0}]}, "would leave none to train"),
    ({"faults": [{"kind": "add_node", "at_step": 3}, {"kind": "add_node", "at_step": 4}]},
     "already has max_nodes=3"),
    ({"faults": [{"kind": "kill_node", "at_step": 40}]}, "is not before the last step 40"),
    ({"storage": "file", "faults": [{"kind": "storage_outage", "at_step": 3}]},
     "storage_outage needs storage s3 or gcs"),
    ({"nodes": 4}, "need min_nodes <= nodes <= max_nodes"),
])
def test_invalid_scenarios_fail_with_one_line_naming_the_problem(changes, message) -> None:
    with pytest.raises(ScenarioError) as err:
        scenario(**changes)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_yaml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"not valid YAML \(line 2\)"):
        load(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load(tmp_path / "missing.yaml")


def test_cli_rejects_an_invalid_scenario_with_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes: 2\ntrain: {}\nfaults: [{kind: kill_node}]\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from elastic_train.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "chaos", "run", str(bad), "--out",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a fault needs exactly one of at_step or during" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 11])
def test_random_faults_are_reproducible_and_valid(seed: int) -> None:
    s = scenario()
    first = draw_faults(s, 4, seed)
    assert first == draw_faults(s, 4, seed)
    assert len(first) == 4
    steps = [f.at_step for f in first]
    assert steps == sorted(steps) and len(set(steps)) == 4
    assert all(f.node is not None for f in first if f.kind != "add_node" and
               f.kind != "storage_outage")


def test_random_faults_differ_between_seeds_and_respect_storage() -> None:
    s = scenario(storage="file")
    draws = {tuple(draw_faults(s, 3, seed)) for seed in range(8)}
    assert len(draws) > 1
    assert all(f.kind != "storage_outage" for d in draws for f in d)


# --------------------------------------------------------------------------------- lineage


def steps(a: int, b: int, world: int = 2, t: float = 0.0) -> list[dict]:
    return [{"step": s, "consumed": f"d{s}", "world_size": world, "time": t + s}
            for s in range(a, b + 1)]


def start(restored: int | None, world: int = 2, t: float = 0.0) -> dict:
    return {"event": Event.START, "restored_step": restored, "world_size": world, "time": t}


def test_lineage_rolls_back_to_the_restored_step() -> None:
    records = [start(None), *steps(1, 7), start(5, 1, 100.0), *steps(6, 10, 1, 100.0)]
    lineage = Lineage.from_records(records)
    assert lineage.problems == []
    assert lineage.column("consumed") == [f"d{s}" for s in range(1, 11)]
    verdict = invariants.exactly_once(records, [f"d{s}" for s in range(1, 11)], 10)
    assert verdict.ok, verdict.detail


def test_lineage_catches_a_skipped_and_a_repeated_step() -> None:
    skipped = [start(None), *steps(1, 3), *steps(5, 6)]
    assert not invariants.exactly_once(skipped, [f"d{s}" for s in range(1, 7)], 6).ok
    repeated = [start(None), *steps(1, 4), *steps(3, 6)]
    verdict = invariants.exactly_once(repeated, [f"d{s}" for s in range(1, 7)], 6)
    assert not verdict.ok and "without a restart" in verdict.detail


def test_lineage_catches_a_wrong_batch_and_a_restore_from_the_future() -> None:
    records = [start(None), *steps(1, 5)]
    reference = [f"d{s}" for s in range(1, 6)]
    reference[2] = "other"
    verdict = invariants.exactly_once(records, reference, 5)
    assert not verdict.ok and "first step 3" in verdict.detail
    future = [start(None), *steps(1, 2), start(4), *steps(5, 5)]
    assert not invariants.exactly_once(future, [f"d{s}" for s in range(1, 6)], 5).ok


def test_restores_must_come_from_commits() -> None:
    records = [start(None), *steps(1, 10), {"event": Event.COMMIT, "step": 5, "time": 6},
               start(10)]
    verdict = invariants.checkpoints_verified(records, [5], lambda s: (True, "ok"))
    assert not verdict.ok and "[10]" in verdict.detail
    good = records[:-1] + [start(5)]
    assert invariants.checkpoints_verified(good, [5], lambda s: (True, "ok")).ok


def test_metrics_tail_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == []
    path.write_text('{"step": 1}\n{"step": ')
    assert tail.poll() == [{"step": 1}]
    with path.open("a") as f:
        f.write('2}\n')
    assert tail.poll() == [{"step": 2}]


# --------------------------------------------------------------------------------- injector


class FakeCluster:
    """The injector's target, recording calls. Its "logs" grow by one at each `log_offsets`;
    `reform_phase` reports the phase last set, only when it was set after `since`."""

    def __init__(self, nodes: int = 2) -> None:
        self.calls: list[tuple] = []
        self.nodes = list(range(nodes))
        self.marks = 0
        self._phase: tuple[int, str | None] = (0, None)
        self.joining: set[int] = set()
        """Nodes added whose workers have not started yet."""

    @property
    def phase(self) -> str | None:
        return self._phase[1]

    @phase.setter
    def phase(self, value: str | None) -> None:
        self._phase = (self.marks, value)

    def log_offsets(self) -> dict[int, int]:
        self.marks += 1
        return {n: self.marks for n in self.nodes}

    def reform_phase(self, since: dict[int, int]) -> str | None:
        at, phase = self._phase
        return phase if at >= max(since.values(), default=0) else None

    def vanish_node(self, index: int) -> float:
        self.calls.append(("vanish", index))
        self.nodes.remove(index)
        return 1.0

    def live_nodes(self) -> list[int]:
        return list(self.nodes)

    def workers_started_at(self, index: int) -> float | None:
        # Nodes of the initial world started before anything the tests feed the injector.
        return None if index in self.joining else float("-inf")

    def add_node(self) -> int:
        self.calls.append(("add",))
        self.nodes.append(len(self.nodes))
        self.joining.add(self.nodes[-1])
        return self.nodes[-1]

    def kill_node(self, index: int) -> float:
        self.calls.append(("kill", index))
        self.nodes.remove(index)
        return 1.0

    def preempt_node(self, index: int, notice_s: float) -> float:
        self.calls.append(("preempt", index, notice_s))
        return 1.0

    def kill_worker(self, index: int, local_rank: int = 0) -> int:
        self.calls.append(("kill_worker", index))
        return 123

    def hang_worker(self, index: int, local_rank: int = 0) -> int:
        self.calls.append(("hang_worker", index))
        return 123


def test_injector_fires_at_steps_and_during_an_upload() -> None:
    cluster = FakeCluster()
    outages: list[float] = []
    faults = [Fault("kill_worker", at_step=3), Fault("storage_outage", at_step=4, seconds=2),
              Fault("kill_node", during="checkpoint_upload", node=1)]
    inj = Injector(faults, cluster, checkpoint_every=5, steps=20, outage=outages.append,
                   log=lambda m: None)
    inj.observe(steps(1, 2))
    assert cluster.calls == []
    inj.observe(steps(3, 5) + [{"event": Event.COMMIT, "step": 5, "time": 6}])
    # kill_worker picks the newest live node; the step-5 upload was committed before we saw it
    assert cluster.calls == [("kill_worker", 1)] and outages == [2]
    inj.observe(steps(6, 10))
    assert cluster.calls[-1] == ("kill", 1)
    assert [f.at_step for f in inj.fired] == [5, 5, 10]
    assert inj.fired[2].detail["upload_step"] == 10
    assert not inj.pending


def test_fault_summaries_attribute_restarts_and_validate(tmp_path: Path) -> None:
    t0 = 1000.0
    records = [start(None, 2, t0 + 1), *steps(1, 12, 2, t0 + 1), start(10, 1, t0 + 20),
               *steps(11, 20, 1, t0 + 20)]
    fired = [Fired(index=0, fault=Fault("kill_node", at_step=12, node=1), node=1, at_step=12,
                   time=t0 + 14, world_before=2)]
    entries = report.summarize_faults(fired, records, t0)
    assert entries[0]["world_after"] == 1
    assert entries[0]["lost_steps"] == 2
    assert entries[0]["recovery_s"] == pytest.approx(20 + 11 - 14)
    assert entries[0]["pause_s"] == pytest.approx((20 + 11) - (1 + 12))
    rep = {"scenario": BASE, "completed": True, "final_step": 20, "wall_s": 40.0,
           "goodput": 0.5, "faults": entries, "run_uri": "file:///x",
           "invariants": {k: {"ok": True, "detail": ""} for k in
                          ("completed", "exactly_once", "weights_match_reference",
                           "checkpoints_verified", "no_orphans")}}
    report.validate(rep)
    png = report.plot_timeline(records, entries, t0, 20, tmp_path / "timeline.png", "t")
    assert png.stat().st_size > 1000
    assert "kill_node" in report.summary_table(rep)


def test_an_added_node_is_timed_to_the_world_it_joined_not_to_the_next_larger_one() -> None:
    """Node 2 is added, node 1 lost before node 2 is in: node 2 joins the survivors' re-form,
    a world of the same size; a later world of three is another node's doing."""
    t0 = 1000.0
    records = [start(None, 2, t0), *steps(1, 12, 2, t0), start(12, 2, t0 + 15),
               *steps(13, 20, 2, t0 + 15), start(20, 3, t0 + 40), *steps(21, 25, 3, t0 + 40)]
    added = Fired(index=0, fault=Fault("add_node", at_step=4), node=2, at_step=4, time=t0 + 5,
                  world_before=2, detail={"joined": True, "joined_at": t0 + 14.5,
                                          "joining_at": t0 + 11})
    lost = Fired(index=1, fault=Fault("kill_node", at_step=9, node=1), node=1, at_step=9,
                 time=t0 + 10, world_before=2)
    entry = report.summarize_faults([added, lost], records, t0)[0]
    assert entry["recovery_s"] == pytest.approx(15 + 13 - 5)
    assert entry["pause_s"] == pytest.approx((15 + 13) - 12)
    # Its boot (fire -> its agent asks to join) and the rest, which the survivors' side owns.
    assert entry["boot_s"] == pytest.approx(11 - 5)
    assert entry["join_s"] == pytest.approx(15 + 13 - 11)
    assert "joined_at" not in entry and "joining_at" not in entry
    # Without the time it joined, the first larger world is all there is to go by.
    del added.detail["joined_at"]
    assert report.summarize_faults([added, lost], records, t0)[0]["recovery_s"] == \
        pytest.approx(40 + 21 - 5)


# --------------------------------------------------------------------------------- waves, reforms


@pytest.mark.parametrize(("faults", "message"), [
    ([{"kind": "kill_worker", "at_step": 3, "node": [0, 1]}],
     "a list of nodes (a wave) is for kill_node, preempt_node, vanish_node, not kill_worker"),
    ([{"kind": "kill_node", "at_step": 3, "node": [1, 1]}], "a wave needs distinct nodes"),
    ([{"kind": "kill_node", "at_step": 3, "node": 1, "within_s": 2}],
     "within_s 2: only a wave (node: a list) spreads its losses"),
    ([{"kind": "kill_node", "at_step": 3, "node": 1, "phase": "workers"}],
     "only a `during: reform` fault has a phase"),
    ([{"kind": "kill_node", "at_step": 3, "node": [0, 1]}], "would leave none to train"),
    ([{"kind": "vanish_node", "during": "reform", "node": 1}],
     "during reform needs a fault before it that makes the world re-form (not none)"),
    ([{"kind": "storage_outage", "at_step": 3},
      {"kind": "vanish_node", "during": "reform", "node": 1}], "(not storage_outage)"),
    ([{"kind": "kill_node", "at_step": 3, "node": 1},
      {"kind": "vanish_node", "during": "reform", "node": 1}], "node 1 was already removed"),
])
def test_bad_waves_and_reform_faults_are_one_line(faults, message) -> None:
    with pytest.raises(ScenarioError) as err:
        scenario(faults=faults)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_wave_may_not_leave_fewer_than_min_nodes() -> None:
    with pytest.raises(ScenarioError, match="would leave fewer than min_nodes=2"):
        scenario(nodes=3, min_nodes=2, faults=[{"kind": "vanish_node", "at_step": 3,
                                                 "node": [1, 2]}])
    ok = scenario(nodes=3, faults=[{"kind": "vanish_node", "at_step": 3, "node": [1, 2],
                                     "within_s": 1.5}])
    assert ok.faults[0].nodes == (1, 2)
    assert ok.to_dict()["faults"][0]["node"] == [1, 2]
    jsonschema.validate(ok.to_dict(), json.loads((CONTRACTS / "scenario.schema.json").read_text()))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wave_loses_its_nodes_at_seeded_offsets_within_its_window() -> None:
    def fire(seed: int) -> tuple[list[tuple], list[float]]:
        cluster, clock = FakeCluster(nodes=4), Clock()
        wave = Fault("kill_node", at_step=3, node=(1, 2, 3), within_s=2.0)
        inj = Injector([wave], cluster, checkpoint_every=5, steps=20, log=lambda m: None,
                       seed=seed, clock=clock)
        inj.observe(steps(1, 3))
        assert cluster.calls == [("kill", 1)] and inj.armed_during
        offsets = sorted(off for *_, off in inj.later)
        assert all(0 <= off <= 2.0 for off in offsets)
        clock.now += offsets[0]
        inj.observe([])
        assert len(cluster.calls) == 2
        clock.now += 2.0
        inj.observe([])
        assert not inj.later and not inj.unfired()
        assert [f.detail["wave"] for f in inj.fired] == [0, 0, 0]
        return cluster.calls, [f.detail["wave_offset_s"] for f in inj.fired]

    first = fire(7)
    assert first == fire(7), "the same seed spreads the wave the same way"
    assert first[0][0] == ("kill", 1) and {c[1] for c in first[0]} == {1, 2, 3}
    assert first[1] != fire(8)[1]


def test_a_reform_fault_waits_for_its_phase_after_the_fault_before_it() -> None:
    cluster = FakeCluster(nodes=3)
    faults = [Fault("kill_node", at_step=3, node=2),
              Fault("vanish_node", during="reform", phase="workers", node=1)]
    inj = Injector(faults, cluster, checkpoint_every=5, steps=20, log=lambda m: None)
    cluster.phase = "workers"  # a phase seen before the first fault does not count
    inj.observe(steps(1, 2))
    assert cluster.calls == []
    inj.observe(steps(3, 3))
    assert cluster.calls == [("kill", 2)] and inj.armed_during
    cluster.phase = "rendezvous"
    inj.observe([])
    assert cluster.calls == [("kill", 2)]
    cluster.phase = "workers"
    inj.observe([])
    assert cluster.calls == [("kill", 2), ("vanish", 1)]
    assert inj.fired[1].detail == {"phase_seen": "workers", "after_start": False,
                                   "in_world": True}


def test_random_faults_draw_vanished_nodes_and_waves() -> None:
    s = scenario(nodes=3, max_nodes=4)
    drawn = [f for seed in range(40) for f in draw_faults(s, 4, seed)]
    kinds = {f.kind for f in drawn}
    assert {"vanish_node", "kill_node", "preempt_node", "add_node", "kill_worker",
            "hang_worker", "storage_outage"} <= kinds
    waves = [f for f in drawn if f.is_wave]
    assert waves and all(len(f.nodes) == 2 and 0.5 <= f.within_s <= 3.0 for f in waves)
    assert {f.kind for f in waves} == {"kill_node", "vanish_node"}
    # A node added or a wave takes seconds: never drawn where the run could end first.
    late = [f for f in drawn if (f.kind == "add_node" or f.is_wave)
            and f.at_step > s.steps - max(10, s.steps // 4)]
    assert not late, late


def test_a_node_lost_before_it_trained_is_recorded_so_at_fire_time() -> None:
    cluster = FakeCluster()
    faults = [Fault("add_node", at_step=2), Fault("kill_node", at_step=3, node=2),
              Fault("kill_node", at_step=4, node=1)]
    inj = Injector(faults, cluster, checkpoint_every=5, steps=20, log=lambda m: None)
    added, early, trained = inj.observe(steps(1, 4))
    assert added.node == 2 and "in_world" not in added.detail
    assert early.detail["in_world"] is False and trained.detail["in_world"] is True
    # Node 2's workers did start, but no world reported `start` after that: it never trained.
    cluster.joining.discard(2)
    cluster.workers_started_at = lambda index: 5.0 if index == 2 else float("-inf")
    late = Injector([Fault("vanish_node", at_step=5, node=2)], cluster, checkpoint_every=5,
                    steps=20, log=lambda m: None)
    assert late.observe([start(None, 2, t=4.0), *steps(5, 5)])[0].detail["in_world"] is False
    again = Injector([Fault("vanish_node", at_step=5, node=2)], cluster, checkpoint_every=5,
                     steps=20, log=lambda m: None)
    assert again.observe([start(3, 3, t=6.0), *steps(5, 5)])[0].detail["in_world"] is True
    # No world grew or shrank by node 2; the run restarted once, for node 1.
    records = [{"event": "start", "time": 0.0, "world_size": 2},
               {"event": "start", "time": 1e9, "world_size": 1}]
    assert invariants.faults_observed(inj.fired, records).ok
    # The same schedule, node 2 having trained before it was killed: its loss must show.
    early.detail["in_world"] = True
    verdict = invariants.faults_observed(inj.fired, records[:1] + [
        {"event": "start", "time": 1e9, "world_size": 2}])
    assert not verdict.ok and "add_node" in verdict.detail


# --------------------------------------------------------------------------------- harness, soak


class GoneCluster:
    """Every node is gone; counts how often the harness looks."""

    def __init__(self) -> None:
        self.looks = 0

    def live_nodes(self) -> list[int]:
        self.looks += 1
        if self.looks > 3:
            raise AssertionError("the harness kept waiting with every node gone")
        return []

    def exit_codes(self) -> dict[int, int | None]:
        return {0: 1, 1: -9}


def test_the_harness_ends_at_once_when_every_node_is_gone_with_an_add_pending(
        tmp_path: Path) -> None:
    from chaos.harness import _drive, _Progress

    lines: list[str] = []
    inj = Injector([Fault("add_node", at_step=30)], FakeCluster(), checkpoint_every=5, steps=40,
                   log=lambda m: None)
    outcome = _drive(GoneCluster(), MetricsTail(tmp_path / "none.jsonl"), inj,
                     _Progress(lines.append, 0.0, 40), 0.0, timeout_s=1e9)
    assert outcome == "no nodes left"
    assert "can no longer fire: add_node at step 30" in lines[-1]
    verdict = invariants.faults_observed([], [], None, [f.describe() for f in inj.unfired()])
    assert not verdict.ok and "never fired" in verdict.detail


def test_soak_tally_counts_invariants_and_recovery_percentiles() -> None:
    from chaos.soak import SoakTally, percentiles, replay_command

    def rep(ok: bool, recoveries: list[float | None]) -> dict:
        return {"outcome": "done" if ok else "timed out",
                "invariants": {"completed": {"ok": ok, "detail": "x"},
                               "no_orphans": {"ok": True, "detail": ""}},
                "faults": [{"kind": "vanish_node", "recovery_s": r} for r in recoveries]
                + [{"kind": "add_node", "recovery_s": 7.0, "pause_s": 2.0, "boot_s": 5.0,
                    "join_s": 2.0 + ok}]}

    tally = SoakTally()
    assert tally.add(1, rep(True, [2.0, 4.0]), "replay 1") == []
    assert tally.add(2, rep(False, [3.0, None]), "replay 2") == ["completed"]
    assert tally.passes == {"completed": 1, "no_orphans": 2}
    d = tally.distribution()["vanish_node"]
    assert (d["n"], d["p50"], d["max"], d["no_restart"]) == (3, 3.0, 4.0, 1)
    assert 3.0 < d["p95"] <= 4.0 and d["join_p50"] is None
    added = tally.distribution()["add_node"]
    assert (added["p50"], added["pause_p50"], added["join_p50"]) == (7.0, 2.0, 2.5)
    assert not tally.ok and tally.failed[0]["seed"] == 2 and tally.failed[0]["replay"] == "replay 2"
    assert "completed                  1/2" in tally.table()
    assert percentiles([]) == {"n": 0, "p50": None, "p95": None, "max": None}
    cmd = replay_command("chaos/scenarios/soak.yaml", 7, 4, Path("runs/soak/seed-7"), 600.0)
    assert cmd == ("elastic-train chaos run chaos/scenarios/soak.yaml --seed 7 --random-faults 4 "
                   "--out runs/soak/seed-7")
