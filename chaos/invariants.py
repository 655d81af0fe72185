"""The invariants a chaos run must keep, each checked after the run into `{ok, detail}`.

1. completed: the run reached train.steps (a `done` event, and final weights on disk).
2. exactly_once: the lineage of the final weights (metrics.jsonl: every `start` rolls it back to
   its `restored_step`, every step line extends it) is steps 1..N, each once, and at each step
   the ranks together trained on what the reference run trained on: the step line's `consumed`
   (fingerprints of the tokens each rank received from its data stream, summed over the ranks in
   the step's all-reduce) equals the reference's. A rank that read a wrong slice, a sample read
   twice, a skipped or repeated step, or a restart from an older position all change it.
3. losses_match_reference: the lineage's per-step losses against the reference's: equal until
   the first step run at another world size, within LOSS_RTOL after it.
4. weights_match_reference: final_model.pt against the fault-free reference: every tensor
   `torch.equal` when the world size never changed; otherwise within WEIGHTS_RTOL (see below).
5. checkpoints_verified: every committed checkpoint left in storage verifies (sizes and CRCs of
   all files) and loads (into a fresh model, in one process); every restart restored the newest
   commit known when it started, unless a `fallback` event says why it took an older one.
6. no_orphans: no process of a node outlives its agent; checked before the harness cleans up.
7. agents_exited: every agent ended the way the run's outcome calls for (0 after `done`, unless
   the harness removed its node or it left after a notice); checked before cleanup.
8. faults_observed: every fault of the scenario fired, and each had the effect it is named after
   (see `fault_effects`: a vanished node's processes seen stopped, a restart after a kill...); a
   fault that never fired, whose action raised, or that changed nothing fails the run: a run
   whose faults did nothing proves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.faults import changed_no_world
from chaos.metrics import Lineage, Record, events, step_records
from elastic_train.events import Event

if TYPE_CHECKING:
    from chaos.faults import Fired
    from checkpointing import CheckpointManager

FALLBACK = getattr(Event, "FALLBACK", "fallback")
"""The event a loader writes when it skips a bad newest commit for an older one."""

WEIGHTS_RTOL = 1e-3
"""Tolerance when the world size changed during the run: for every tensor,
||final - reference||_2 <= WEIGHTS_RTOL * (||reference||_2 + 1e-8).

Why not bit-identical: with W ranks, FSDP reduce-scatters gradients that are sums of W partial
sums, so a different W adds the same numbers in another order and rounds differently (~1e-7
relative per step), and AdamW's normalisation carries such differences into the updates.
Measured here on the tiny model: worst tensor 1.3e-5 (40 steps, worlds 2/1/2) and 7.5e-6 (the
demo, 120 steps, worlds 3/2/1/2/1). 1e-3 leaves ~100x room. Skipped or repeated batches are
caught by exactly_once, not by this tolerance; this check catches state that was restored
wrongly (optimizer, step, model shards)."""


LOSS_RTOL = 1e-3
"""Tolerance of a step's loss once the world size has differed from the reference's:
|loss - reference| <= LOSS_RTOL * |reference|. Until then the same numbers are added in the same
order, so losses must be equal. Why this figure: the weights then differ by about 1e-5 relative
(see WEIGHTS_RTOL), which moves a cross-entropy loss by about as much; a skipped, repeated or
wrong batch moves it by percents, and is caught by exactly_once anyway."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


def completed(records: list[Record], steps: int, final_model: Path) -> Verdict:
    done = events(records, Event.DONE)
    last = max((int(r["step"]) for r in step_records(records)), default=0)
    if not done:
        return Verdict(False, f"no done event; last step reported {last} of {steps}")
    if int(done[-1].get("step", -1)) != steps:
        return Verdict(False, f"done at step {done[-1].get('step')}, expected {steps}")
    if not final_model.exists():
        return Verdict(False, f"done, but {final_model} is missing")
    return Verdict(True, f"reached step {steps}")


def _first_problems(problems: list[str]) -> str:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def exactly_once(records: list[Record], reference: Sequence[str | None], steps: int) -> Verdict:
    """`reference[s - 1]` is the reference run's `consumed` at step s (what its ranks trained on).
    A step line without `consumed` counts as different: what a rank read must be reported."""
    lineage = Lineage.from_records(records)
    if lineage.problems:
        return Verdict(False, _first_problems(lineage.problems))
    if lineage.final_step != steps:
        return Verdict(False, f"the lineage ends at step {lineage.final_step}, not {steps}")
    if len(reference) < steps or any(r is None for r in reference[:steps]):
        return Verdict(False, f"the reference lacks what was consumed at some of steps 1..{steps}")
    consumed = lineage.column("consumed")
    wrong = [s + 1 for s, (a, b) in enumerate(zip(consumed, reference, strict=False)) if a != b]
    if wrong:
        first = wrong[0]
        got = consumed[first - 1]
        return Verdict(False, f"{len(wrong)} step(s) trained on other samples than the "
                              f"reference, first step {first} (consumed {got}, reference "
                              f"{reference[first - 1]})")
    rollbacks = sum(1 for r in lineage.restores if r is not None)
    reported = len(step_records(records))
    return Verdict(True, f"steps 1..{steps} once each, the ranks' samples as the reference's "
                         f"({reported} step lines, {reported - steps} redone after "
                         f"{len(lineage.restores) - 1} restarts, {rollbacks} restores)")


def losses_match(records: list[Record], reference: Sequence[float | None], reference_world: int,
                 steps: int) -> Verdict:
    """`reference[s - 1]`: the reference run's loss at step s, at world size `reference_world`.
    Along the lineage, a loss must equal the reference's until the first step run at another
    world size, and be within LOSS_RTOL after it."""
    lineage = Lineage.from_records(records)
    if lineage.problems:
        return Verdict(False, _first_problems(lineage.problems))
    if lineage.final_step < steps or len(reference) < steps:
        return Verdict(False, f"{lineage.final_step} steps in the lineage, {len(reference)} in "
                              f"the reference; expected {steps}")
    diverged_at: int | None = None
    worst, worst_step = 0.0, 0
    for s, (r, want) in enumerate(zip(lineage.steps[:steps], reference, strict=False), start=1):
        if r is None or want is None or not isinstance(r.get("loss"), (int, float)):
            return Verdict(False, f"step {s}: no loss to compare")
        if diverged_at is None and int(r.get("world_size", reference_world)) != reference_world:
            diverged_at = s
        got = float(r["loss"])
        if diverged_at is None:
            if got != want:
                return Verdict(False, f"step {s}: loss {got!r} != reference {want!r} with the "
                                      f"world size never changed before it")
            continue
        rel = abs(got - want) / max(abs(want), 1e-12)
        if not math.isfinite(rel) or rel > LOSS_RTOL:
            return Verdict(False, f"step {s}: loss {got:.6g} vs reference {want:.6g}, relative "
                                  f"difference {rel:.2e} > {LOSS_RTOL:g} (world first differed "
                                  f"at step {diverged_at})")
        if rel > worst:
            worst, worst_step = rel, s
    if diverged_at is None:
        return Verdict(True, f"{steps} losses equal to the reference's")
    return Verdict(True, f"equal up to step {diverged_at - 1}; after the world changed at step "
                         f"{diverged_at}, worst relative difference {worst:.2e} (step "
                         f"{worst_step}) <= {LOSS_RTOL:g}")


def weights_match(final_model: Path, reference_model: Path, world_changed: bool) -> Verdict:
    import torch

    if not final_model.exists():
        return Verdict(False, f"{final_model} is missing")
    if not reference_model.exists():
        return Verdict(False, f"reference weights {reference_model} are missing")
    got = torch.load(final_model, map_location="cpu", weights_only=True)
    want = torch.load(reference_model, map_location="cpu", weights_only=True)
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        return Verdict(False, f"different tensors: missing {missing}, unexpected {extra}")
    worst, worst_name, unequal = 0.0, "", 0
    for name, ref in want.items():
        t = got[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return Verdict(False, f"{name}: {tuple(t.shape)} {t.dtype} vs reference "
                                  f"{tuple(ref.shape)} {ref.dtype}")
        if torch.equal(t, ref):
            continue
        unequal += 1
        rel = float((t.double() - ref.double()).norm() / (ref.double().norm() + 1e-8))
        if rel > worst:
            worst, worst_name = rel, name
    if not world_changed:
        if unequal:
            return Verdict(False, f"world size never changed but {unequal}/{len(want)} tensors "
                                  f"differ (worst {worst_name}: relative L2 {worst:.2e})")
        return Verdict(True, f"bit-identical to the reference ({len(want)} tensors)")
    if worst > WEIGHTS_RTOL:
        return Verdict(False, f"{worst_name}: relative L2 distance {worst:.2e} > "
                              f"tolerance {WEIGHTS_RTOL:g}")
    return Verdict(True, f"world size changed; {unequal}/{len(want)} tensors differ, worst "
                         f"relative L2 {worst:.2e} <= {WEIGHTS_RTOL:g}")


def stale_restores(records: list[Record]) -> list[str]:
    """Restarts that restored something other than the newest commit known when they started
    (the newest `commit` event earlier in the file), with no `fallback` event since the previous
    start to explain it. A restore of a step newer than every logged commit is not stale (rank 0
    may die between writing COMMIT.json and logging it; `checkpoints_verified` checks that such
    a step was committed)."""
    newest: int | None = None
    fallback_since_start = False
    stale = []
    for r in records:
        name = r.get("event")
        if name == Event.COMMIT:
            newest = max(int(r["step"]), newest if newest is not None else -1)
        elif name == FALLBACK:
            fallback_since_start = True
        elif name == Event.START:
            restored = r.get("restored_step")
            if newest is not None and (restored is None or int(restored) < newest) \
                    and not fallback_since_start:
                what = "nothing" if restored is None else f"step {restored}"
                stale.append(f"a restart restored {what} while step {newest} was the newest "
                             f"commit, and no fallback event says why")
            fallback_since_start = False
    return stale


def checkpoints_verified(records: list[Record], committed_now: list[int],
                         verify: Callable[[int], tuple[bool, str]],
                         committed_during: Iterable[int] = ()) -> Verdict:
    """`committed_now`: steps with a commit marker in storage after the run; `verify(step)`
    returns (ok, why) for one of them (the harness's checks its files and loads it);
    `committed_during`: steps seen committed in storage while the run trained (a commit whose
    event died with rank 0, since collected as garbage, was still a commit)."""
    committed_seen = {int(r["step"]) for r in events(records, Event.COMMIT)} | \
        set(committed_now) | set(committed_during)
    bad_restores = [r.get("restored_step") for r in events(records, Event.START)
                    if r.get("restored_step") is not None
                    and int(r["restored_step"]) not in committed_seen]
    if bad_restores:
        return Verdict(False, f"restored step(s) {bad_restores} that were never committed")
    stale = stale_restores(records)
    if stale:
        return Verdict(False, _first_problems(stale))
    failures = []
    for step in committed_now:
        ok, why = verify(step)
        if not ok:
            failures.append(f"step {step}: {why}")
    if failures:
        return Verdict(False, "; ".join(failures))
    if not committed_now:
        return Verdict(False, "no committed checkpoint in storage")
    restores = sorted({int(r["restored_step"]) for r in events(records, Event.START)
                       if r.get("restored_step") is not None})
    return Verdict(True, f"{len(committed_now)} committed checkpoint(s) verify and load "
                         f"({', '.join(map(str, committed_now))}); restores only from the newest "
                         f"commit ({', '.join(map(str, restores)) or 'none'})")


def no_orphans(survivors: Iterable[str]) -> Verdict:
    """`survivors`: processes of nodes whose agent had exited, still alive (before cleanup)."""
    survivors = list(survivors)
    if survivors:
        return Verdict(False, f"{len(survivors)} process(es) outlived their agent: "
                              + ", ".join(survivors[:5]))
    return Verdict(True, "no process outlived its agent")


@dataclass(frozen=True)
class AgentEnd:
    """How one node's agent ended, as seen before the harness cleaned up."""

    node: int
    code: int | None
    """Its exit code (negative: killed by that signal); None: still running."""
    removed: bool = False
    """The harness killed it (kill_node, or a preempted node reclaimed)."""
    noticed: bool = False
    """It was given a preemption notice (it leaves with its agent stopped)."""
    joined_final_world: bool = True
    """False for a node added after the last world formed: it may still wait in the rendezvous."""


def agents_exited(agents: Iterable[AgentEnd], run_completed: bool) -> Verdict:
    """After a completed run every agent the harness did not remove or notice exited 0, and none
    is still running unless it was added after the last world formed. A run that did not
    complete fails here too, naming the codes (it already fails `completed`)."""
    agents = list(agents)
    codes = {a.node: a.code for a in agents}
    if not run_completed:
        return Verdict(False, f"the run did not complete; agents' exit codes {codes}")
    wrong = [f"node {a.node}: {'still running' if a.code is None else 'exit ' + str(a.code)}"
             for a in agents
             if not (a.removed or a.noticed) and a.code != 0
             and not (a.code is None and not a.joined_final_world)]
    if wrong:
        return Verdict(False, "agents did not exit 0 after done: " + ", ".join(wrong))
    return Verdict(True, f"agents' exit codes {codes} as the run's end calls for")


def fault_effects(fired: Iterable[Fired], records: list[Record],
                  outage_hits: Callable[[float, float], int] | None = None) -> list[str]:
    """What each fired fault (`chaos.faults.Fired`) failed to do; empty when every one had its
    effect. A fault whose action raised did nothing. Otherwise, from the run's metrics:

    - kill_node, kill_worker, hang_worker: a restart (`start`) followed it;
    - preempt_node, vanish_node: a later world was smaller than the one it hit (the freeze itself
      is checked when it fires: every process of the node seen stopped); add_node: a later one
      larger, or the node's agent started its workers in a world (`detail["joined"]`, set by
      the harness: a node added while another was lost joins a world of the same size);
    - storage_outage: the storage proxy failed at least one request in its window
      (`outage_hits(t0, t1)` counts them);
    - a node lost before it ever trained (`detail["in_world"]` False, recorded when the fault
      fired: an added node still joining, or whose first workers had not yet been through a
      world's `start`): its action succeeding is all there is to see, and its own
      add_node is exempt too (no world could grow by a node that was gone);
    - `during: checkpoint_upload`: the upload of `upload_step` had been asked for (a save of it
      committed or failed at some point, or the restart it caused came before any commit of
      it) and had not committed when the fault fired.
    """
    fired = list(fired)
    problems = []
    starts = events(records, Event.START)
    for f, unseen in zip(fired, changed_no_world(fired), strict=True):
        kind = f.fault.kind
        label = f"{kind}{'' if f.node is None else ' node ' + str(f.node)} at step {f.at_step}"
        if "error" in f.detail:
            problems.append(f"{label}: its action failed ({f.detail['error']})")
            continue
        if unseen:
            continue
        later = [r for r in starts if float(r["time"]) > f.time]
        if kind in ("kill_node", "kill_worker", "hang_worker") and not later:
            problems.append(f"{label}: no restart followed it")
        elif kind in ("preempt_node", "vanish_node") and not any(
                int(r.get("world_size", 0)) < f.world_before for r in later):
            problems.append(f"{label}: no smaller world followed it")
        elif kind == "add_node" and not f.detail.get("joined") and not any(
                int(r.get("world_size", 0)) > f.world_before for r in later):
            problems.append(f"{label}: no larger world followed it")
        elif kind == "storage_outage":
            seconds = float(f.fault.seconds or 0.0)
            if outage_hits is None or outage_hits(f.time, f.time + seconds + 1.0) == 0:
                problems.append(f"{label}: no storage request failed in its window")
        if f.fault.during == "checkpoint_upload":
            problem = _upload_in_flight(f, records)
            if problem:
                problems.append(f"{label}: {problem}")
    return problems


def _upload_in_flight(f: Fired, records: list[Record]) -> str:
    step = f.detail.get("upload_step")
    if step is None:
        return "no upload was in flight"
    ends = [r for r in records if r.get("event") in (Event.COMMIT, Event.SAVE_FAILED)
            and int(r["step"]) == int(step)]
    if any(float(r["time"]) <= f.time for r in ends if r.get("event") == Event.COMMIT):
        return f"step {step} had committed before it fired"
    began = [float(r["time"]) - float(r.get("commit_s", 0.0)) for r in ends
             if r.get("event") == Event.COMMIT]
    if began and min(began) > f.time and not _restart_between(records, f.time, min(began)):
        return f"the save of step {step} began only after it fired"
    return ""


def _restart_between(records: list[Record], t0: float, t1: float) -> bool:
    return any(t0 < float(r["time"]) < t1 for r in events(records, Event.START))


def faults_observed(fired: Iterable[Fired], records: list[Record],
                    outage_hits: Callable[[float, float], int] | None = None,
                    unfired: Iterable[str] = ()) -> Verdict:
    """`fired`: one record per fault action (a wave's nodes each have one); `unfired`: the
    descriptions of faults that never (wholly) fired."""
    fired = list(fired)
    problems = fault_effects(fired, records, outage_hits)
    problems += [f"{what}: never fired" for what in unfired]
    if problems:
        return Verdict(False, _first_problems(problems))
    return Verdict(True, f"each of {len(fired)} fault(s) had its effect")


def world_changed(records: list[Record], reference_world: int) -> bool:
    """Whether any step ran at a world size other than the reference's."""
    return any(int(r.get("world_size", reference_world)) != reference_world
               for r in step_records(records))


def load_checkpoint(manager: CheckpointManager, step: int,
                    build_state: Callable[[], Mapping[str, Any]]) -> tuple[bool, str]:
    """Verify `step` (sizes and CRCs against COMMIT.json), then load it into a fresh state from
    `build_state()` in this process (a world of one: DCP reshards). (ok, why); never raises."""
    report = manager.verify(step)
    if not report.ok:
        return False, str(report.detail)
    state = build_state()
    try:
        loaded = manager.load(state, step=step)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False, f"verifies, but does not load: {type(e).__name__}: {e}"
    trainer = state.get("trainer")
    got = trainer.get("step") if isinstance(trainer, Mapping) else None
    if loaded != step or (got is not None and int(got) != step):
        return False, f"loading it gave step {got if got is not None else loaded}"
    return True, f"{report.detail}; loads at world size 1"
