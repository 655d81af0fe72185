"""Every chaos invariant fails the run it should: each test takes one real fault-free run (a
real torchrun of the trainer at world size 2, its metrics and checkpoints), breaks a copy of it
on purpose (a skipped or repeated step, a rank that read other samples, a restore from an older
commit, a corrupted shard, a changed loss, a fault that did nothing, an orphan) and checks that
the invariant catches it, and that the unbroken run passes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torchrun_util import train

from chaos import harness, invariants
from chaos.cluster import NODE_ENV, TAG_ENV
from chaos.faults import Fired
from chaos.metrics import read_all, step_records
from chaos.scenario import Fault
from checkpointing import CheckpointManager, ModelOptimizerState
from elastic_train import config as config_lib
from elastic_train import data
from elastic_train.events import Event
from elastic_train.spec import fresh_model, resolve
from elastic_train.trainer import consumed_fingerprints, data_digest

STEPS = 6
BATCH, SEQ = 6, 32
TRAIN = (f"--steps={STEPS}", "--checkpoint.every=3", f"--data.batch_size={BATCH}",
         f"--data.seq_len={SEQ}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fault-free run at world size 2: metrics.jsonl, checkpoints of steps 3 and 6, data."""
    run_dir = tmp_path_factory.mktemp("inv") / "run"
    train(run_dir, 2, *TRAIN)
    return run_dir


@pytest.fixture
def records(run: Path) -> list[dict[str, Any]]:
    return read_all(run / "metrics.jsonl")


def reference_of(records: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in step_records(records)]


def start(restored: int | None, world: int = 2, t: float = 0.0) -> dict[str, Any]:
    return {"event": Event.START, "restored_step": restored, "world_size": world, "time": t}


# --------------------------------------------------------------------------- exactly_once


def test_the_unbroken_run_passes_exactly_once_and_the_loss_check(records) -> None:
    verdict = invariants.exactly_once(records, reference_of(records, "consumed"), STEPS)
    assert verdict.ok, verdict.detail
    verdict = invariants.losses_match(records, reference_of(records, "loss"), 2, STEPS)
    assert verdict.ok and "equal" in verdict.detail, verdict.detail


def test_a_skipped_step_fails_exactly_once(records) -> None:
    broken = [r for r in records if r.get("step") != 3 or "event" in r]
    verdict = invariants.exactly_once(broken, reference_of(records, "consumed"), STEPS)
    assert not verdict.ok and "step 4 reported after step 2" in verdict.detail


def test_a_repeated_step_fails_exactly_once(records) -> None:
    steps = step_records(records)
    i = records.index(steps[3])
    broken = records[:i + 1] + [copy.deepcopy(steps[3])] + records[i + 1:]
    verdict = invariants.exactly_once(broken, reference_of(records, "consumed"), STEPS)
    assert not verdict.ok and "without a restart" in verdict.detail


def test_a_restart_that_resumed_the_data_at_an_older_position_fails_exactly_once(records) -> None:
    """Steps 4..6 redone after a restore of step 3, but with the data of steps 3..5: every
    step number is there once, only what the ranks read betrays it."""
    steps = step_records(records)
    redone = [{**r, "consumed": steps[i - 1]["consumed"]} for i, r in enumerate(steps) if i >= 3]
    broken = [*records, start(3, t=1e12), *redone]
    verdict = invariants.exactly_once(broken, reference_of(records, "consumed"), STEPS)
    assert not verdict.ok and "first step 4" in verdict.detail, verdict.detail


def fingerprints(run: Path, step: int, world: int, shares: dict[int, int] | None = None
                 ) -> str:
    """`consumed` of global batch `step - 1` as the ranks of `world` would report it, each
    reading through its own DataStream; `shares` makes rank r read rank shares[r]'s slice."""
    store = data.TokenStore(str(run / "data"))
    total = torch.zeros(BATCH, dtype=torch.float64)
    for rank in range(world):
        reads_as = (shares or {}).get(rank, rank)
        stream = data.DataStream(data.TokenDataset(store, SEQ), batch_size=BATCH, seed=0,
                                 rank=reads_as,
                                 world_size=world, start_step=step - 1, prefetch=0)
        batch = next(stream)
        total += consumed_fingerprints(batch, BATCH, SimpleNamespace(rank=rank, size=world))
    return data_digest(total.tolist())


def test_what_ranks_read_is_what_the_run_reported_at_any_world_size(run, records) -> None:
    """The fingerprints come from the tokens the stream hands over, so any split of the batch
    that covers it once gives the reference's `consumed`."""
    config = config_lib.load(None, {})
    assert config.seed == 0
    want = reference_of(records, "consumed")
    for world in (1, 2, 3):
        assert fingerprints(run, 2, world) == want[1]


def test_a_rank_reading_another_ranks_slice_fails_exactly_once(run, records) -> None:
    """Rank 1 reads rank 0's samples: one sample twice, one never, and the step number right."""
    wrong = fingerprints(run, 2, 2, shares={1: 0})
    assert wrong != reference_of(records, "consumed")[1]
    broken = [{**r, "consumed": wrong} if r.get("step") == 2 and "event" not in r else r
              for r in records]
    verdict = invariants.exactly_once(broken, reference_of(records, "consumed"), STEPS)
    assert not verdict.ok and "first step 2" in verdict.detail


def test_a_step_line_that_does_not_say_what_was_read_fails(records) -> None:
    broken = [{k: v for k, v in r.items() if k != "consumed"} for r in records]
    assert not invariants.exactly_once(broken, reference_of(records, "consumed"), STEPS).ok


# --------------------------------------------------------------------------- losses


def test_a_loss_off_by_one_ulp_in_the_same_world_fails(records) -> None:
    ref = reference_of(records, "loss")
    broken = [{**r, "loss": float(torch.nextafter(torch.tensor(r["loss"], dtype=torch.float64),
                                                  torch.tensor(1e9, dtype=torch.float64)))}
              if r.get("step") == 5 and "event" not in r else r for r in records]
    verdict = invariants.losses_match(broken, ref, 2, STEPS)
    assert not verdict.ok and "step 5" in verdict.detail


def test_losses_after_a_world_change_are_held_to_the_stated_tolerance(records) -> None:
    ref = reference_of(records, "loss")

    def shifted(rel: float) -> list[dict[str, Any]]:
        return [{**r, "world_size": 1, "loss": r["loss"] * (1 + rel)}
                if r.get("step", 0) >= 4 and "event" not in r else r for r in records]

    ok = invariants.losses_match(shifted(invariants.LOSS_RTOL / 10), ref, 2, STEPS)
    assert ok.ok and "world changed at step 4" in ok.detail, ok.detail
    bad = invariants.losses_match(shifted(invariants.LOSS_RTOL * 10), ref, 2, STEPS)
    assert not bad.ok and "step 4" in bad.detail


# --------------------------------------------------------------------------- restores


def commit(step: int) -> dict[str, Any]:
    return {"event": Event.COMMIT, "step": step, "stall_s": 0.0, "commit_s": 0.0, "time": 0.0}


def test_a_restore_from_an_older_commit_fails_unless_a_fallback_explains_it() -> None:
    records = [start(None), commit(3), commit(6), start(3)]
    verdict = invariants.checkpoints_verified(records, [3, 6], lambda s: (True, "ok"))
    assert not verdict.ok and "step 6 was the newest" in verdict.detail
    fallback = {"event": invariants.FALLBACK, "step": 6, "time": 0.0}
    explained = [start(None), commit(3), commit(6), fallback, start(3)]
    assert invariants.checkpoints_verified(explained, [3, 6], lambda s: (True, "ok")).ok
    # A fallback explains only the restart it preceded.
    later = [*explained, commit(9), start(6)]
    assert not invariants.checkpoints_verified(later, [3, 6, 9], lambda s: (True, "ok")).ok
    scratch = [start(None), commit(3), start(None)]
    assert not invariants.checkpoints_verified(scratch, [3], lambda s: (True, "ok")).ok


def test_restoring_the_newest_commit_passes() -> None:
    records = [start(None), commit(3), start(3), commit(6), start(6)]
    assert invariants.checkpoints_verified(records, [3, 6], lambda s: (True, "ok")).ok


def test_a_restore_of_a_step_never_committed_fails_unless_storage_showed_its_commit() -> None:
    """Rank 0 killed right after committing step 9 logs no `commit` for it; the restart restores
    9, and garbage collection removes it before the run ends. Only what the harness saw in
    storage during the run tells that commit from a restore of uncommitted files."""
    records = [start(None), commit(3), commit(6), start(9), commit(12), commit(15)]
    verdict = invariants.checkpoints_verified(records, [12, 15], lambda s: (True, "ok"))
    assert not verdict.ok and "[9] that were never committed" in verdict.detail
    assert invariants.checkpoints_verified(records, [12, 15], lambda s: (True, "ok"),
                                           committed_during=[3, 6, 9, 12]).ok


# --------------------------------------------------------------------------- checkpoints load


def state_factory(run: Path, seq_len: int = SEQ):
    vocab = data.TokenStore(str(run / "data")).vocab_size
    cfg = config_lib.load(None, {"data.seq_len": str(seq_len)})

    def build() -> dict[str, Any]:
        model = fresh_model(resolve(cfg.model), cfg, vocab)
        return {"app": ModelOptimizerState(model), "trainer": {"step": -1, "config_digest": ""}}

    return build


def checkpoint_copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", dest)
    return dest


def verdicts(uri: Path, build) -> dict[int, tuple[bool, str]]:
    with CheckpointManager("file://" + str(uri)) as manager:
        return {i.step: invariants.load_checkpoint(manager, i.step, build)
                for i in manager.steps()}


def test_every_committed_checkpoint_of_the_run_loads(run: Path, tmp_path: Path) -> None:
    got = verdicts(checkpoint_copy(run, tmp_path), state_factory(run))
    assert sorted(got) == [3, 6]
    assert all(ok for ok, _ in got.values()), got
    assert all("loads at world size 1" in why for _, why in got.values())


def test_the_harness_sees_commits_while_the_run_trains(run: Path, tmp_path: Path) -> None:
    """`CommitWatcher` lists what is committed as it appears, and keeps it once it is gone."""
    from chaos.harness import CommitWatcher

    ckpt = checkpoint_copy(run, tmp_path)
    step3 = ckpt / "step_00000003"
    held = tmp_path / "held"
    step3.rename(held)  # not there yet
    with CommitWatcher("file://" + str(ckpt), {}) as watcher:
        deadline = time.monotonic() + 30
        while watcher.seen != {6} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.seen == {6}
        held.rename(step3)  # committed later
        while 3 not in watcher.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(step3)  # then collected as garbage
    assert watcher.seen == {3, 6}


def test_a_corrupted_or_truncated_shard_fails_checkpoints_verified(run: Path,
                                                                    tmp_path: Path) -> None:
    ckpt = checkpoint_copy(run, tmp_path)
    flipped = sorted((ckpt / "step_00000006").glob("*.distcp"))[0]
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated = sorted((ckpt / "step_00000003").glob("*.distcp"))[-1]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    got = verdicts(ckpt, state_factory(run))
    assert not got[6][0] and flipped.name in got[6][1]
    assert not got[3][0] and truncated.name in got[3][1]
    records = [start(None), commit(3), commit(6)]
    verdict = invariants.checkpoints_verified(records, [3, 6], lambda s: got[s])
    assert not verdict.ok and "step 3" in verdict.detail and "step 6" in verdict.detail


def test_a_checkpoint_that_verifies_but_does_not_load_fails(run: Path, tmp_path: Path) -> None:
    """Files intact, but not a checkpoint of this trainer (another sequence length): only
    loading it tells."""
    got = verdicts(checkpoint_copy(run, tmp_path), state_factory(run, seq_len=SEQ * 2))
    assert not got[6][0] and "does not load" in got[6][1], got[6]


# --------------------------------------------------------------------------- processes


def test_an_agent_that_did_not_exit_0_after_done_fails() -> None:
    end = invariants.AgentEnd
    assert invariants.agents_exited([end(0, 0), end(1, -9, removed=True),
                                     end(2, 1, noticed=True)], run_completed=True).ok
    verdict = invariants.agents_exited([end(0, 0), end(1, 1)], run_completed=True)
    assert not verdict.ok and "node 1: exit 1" in verdict.detail
    verdict = invariants.agents_exited([end(0, 0), end(1, None)], run_completed=True)
    assert not verdict.ok and "node 1: still running" in verdict.detail
    late = end(1, None, joined_final_world=False)
    assert invariants.agents_exited([end(0, 0), late], run_completed=True).ok
    assert not invariants.agents_exited([end(0, 0)], run_completed=False).ok


def test_a_process_left_behind_by_an_exited_agent_is_an_orphan_before_cleanup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process carrying the node's tags outlives its (exited) agent: the check, made
    before the harness kills anything, names it; once it is gone, the check passes."""
    monkeypatch.setattr(harness, "ORPHAN_GRACE_S", 0.5)
    tag = f"inv-{os.getpid()}-{time.monotonic_ns()}"
    agent = subprocess.Popen([sys.executable, "-c", "pass"])
    agent.wait()
    node = SimpleNamespace(index=0, agent=agent, removed=None)
    cluster = SimpleNamespace(tag=tag, nodes=[node])
    records = [start(None), {"event": Event.DONE, "step": 1, "time": 1.0}]
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              env={**os.environ, TAG_ENV: tag, NODE_ENV: "0"})
    try:
        checks = harness._agents_and_orphans(cluster, [], records, completed=True)
        assert not checks["no_orphans"].ok and str(orphan.pid) in checks["no_orphans"].detail
        assert checks["agents_exited"].ok, checks["agents_exited"].detail
    finally:
        orphan.kill()
        orphan.wait()
    checks = harness._agents_and_orphans(cluster, [], records, completed=True)
    assert checks["no_orphans"].ok, checks["no_orphans"].detail


# --------------------------------------------------------------------------- faults


def fired(kind: str, t: float, *, during: str | None = None, world: int = 2,
          **detail: Any) -> Fired:
    fault = Fault(kind=kind, at_step=None if during else 2, during=during, node=1,
                  seconds=3.0 if kind == "storage_outage" else None)
    return Fired(index=0, fault=fault, node=1, at_step=2, time=t, world_before=world,
                 detail=dict(detail))


def test_a_fault_whose_action_failed_or_changed_nothing_fails_faults_observed() -> None:
    restart = [start(None, t=0.0), start(2, world=1, t=20.0)]
    assert invariants.faults_observed([fired("kill_node", 10.0)], restart).ok
    failed = fired("kill_worker", 10.0, error="ClusterError: node 1 has no workers after 30 s")
    verdict = invariants.faults_observed([failed], restart)
    assert not verdict.ok and "its action failed" in verdict.detail
    verdict = invariants.faults_observed([fired("kill_node", 30.0)], restart)
    assert not verdict.ok and "no restart followed" in verdict.detail
    assert not invariants.faults_observed([fired("add_node", 10.0)], restart).ok
    assert invariants.faults_observed([fired("preempt_node", 10.0)], restart).ok
    # A node added while another left joins a world of the same size: its agent's log is what
    # shows it joined (the harness records it); without that, the same run fails.
    same_size = [start(None, t=0.0), start(2, world=2, t=20.0)]
    assert invariants.faults_observed([fired("add_node", 10.0, joined=True)], same_size).ok
    verdict = invariants.faults_observed([fired("add_node", 10.0, joined=False)], same_size)
    assert not verdict.ok and "no larger world" in verdict.detail


def test_a_storage_outage_that_failed_no_request_fails() -> None:
    outage = fired("storage_outage", 10.0)
    assert not invariants.faults_observed([outage], [], outage_hits=lambda a, b: 0).ok
    assert invariants.faults_observed([outage], [], outage_hits=lambda a, b: 3).ok
    assert not invariants.faults_observed([outage], [], outage_hits=None).ok


def test_a_kill_during_an_upload_counts_only_if_the_upload_was_in_flight() -> None:
    restart = [start(None, t=0.0), start(5, t=20.0)]
    # Step 10's save began at 9.5 and committed at 10.5: in flight when the kill came at 10.
    in_flight = [*restart, {**commit(10), "time": 10.5, "commit_s": 1.0}]
    kill = fired("kill_node", 10.0, during="checkpoint_upload", upload_step=10)
    assert invariants.faults_observed([kill], in_flight).ok
    # Committed before the kill: the fault hit nothing in flight.
    done = [*restart, {**commit(10), "time": 9.8, "commit_s": 0.3}]
    verdict = invariants.faults_observed([kill], done)
    assert not verdict.ok and "committed before it fired" in verdict.detail
    # Its save began only after the kill (a guess from the step number, not an upload).
    late = [start(None, t=0.0), {**commit(10), "time": 12.0, "commit_s": 1.0}, start(10, t=20)]
    verdict = invariants.faults_observed([kill], late)
    assert not verdict.ok and "began only after" in verdict.detail
    nothing = fired("kill_node", 10.0, during="checkpoint_upload", upload_step=None)
    assert not invariants.faults_observed([nothing], restart).ok


def test_the_report_keeps_the_new_invariants() -> None:
    """report.json's schema requires the five invariants and accepts the others."""
    from chaos import report

    checks = {name: {"ok": True, "detail": ""} for name in
              ("completed", "exactly_once", "losses_match_reference", "weights_match_reference",
               "checkpoints_verified", "no_orphans", "agents_exited", "faults_observed")}
    report.validate({"scenario": {}, "completed": True, "final_step": STEPS, "wall_s": 1.0,
                     "goodput": 1.0, "invariants": checks, "faults": [], "run_uri": "file:///x"})
    assert json.dumps(checks)
