"""The invariants a chaos run must keep, each checked after the run into `{ok, detail}`.

1. completed: the run reached train.steps (a `done` event, and final weights on disk).
2. exactly_once: the lineage of the final weights (metrics.jsonl: every `start` rolls it back to
   its `restored_step`, every step line extends it) is steps 1..N, each once, each with the
   reference run's batch_digest.
3. weights_match_reference: final_model.pt against the fault-free reference: every tensor
   `torch.equal` when the world size never changed; otherwise within WEIGHTS_RTOL (see below).
4. checkpoints_verified: every committed checkpoint left in storage verifies (sizes and CRCs of
   all files), and every restart restored a step that had been committed.
5. no_orphans: no process of the run is alive after it.
6. faults_took_effect: every fault of the scenario fired, and each one's effect was observed (a
   vanished node's processes seen stopped, a killed worker's pid found...): a run whose faults did
   nothing proves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from chaos.metrics import Lineage, Record, events, step_records
from elastic_train.events import Event

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


def exactly_once(records: list[Record], reference: list[str | None], steps: int) -> Verdict:
    """`reference[s - 1]` is the reference run's batch_digest of step s."""
    lineage = Lineage.from_records(records)
    if lineage.problems:
        return Verdict(False, lineage.problems[0] + (
            f" (+{len(lineage.problems) - 1} more)" if len(lineage.problems) > 1 else ""))
    if lineage.final_step != steps:
        return Verdict(False, f"the lineage ends at step {lineage.final_step}, not {steps}")
    if len(reference) < steps:
        return Verdict(False, f"the reference has {len(reference)} steps, not {steps}")
    wrong = [s + 1 for s, (a, b) in enumerate(zip(lineage.digests, reference, strict=False))
             if a != b]
    if wrong:
        return Verdict(False, f"{len(wrong)} steps differ from the reference's batches, first "
                              f"step {wrong[0]}")
    rollbacks = sum(1 for r in lineage.restores if r is not None)
    reported = len(step_records(records))
    return Verdict(True, f"steps 1..{steps} once each, batches as the reference "
                         f"({reported} step lines, {reported - steps} redone after "
                         f"{len(lineage.restores) - 1} restarts, {rollbacks} restores)")


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


def checkpoints_verified(records: list[Record], committed_now: list[int],
                         verify: Callable[[int], tuple[bool, str]]) -> Verdict:
    """`committed_now`: steps with a commit marker in storage after the run; `verify(step)`
    returns (ok, why) for one of them."""
    committed_seen = {int(r["step"]) for r in events(records, Event.COMMIT)} | set(committed_now)
    bad_restores = [r.get("restored_step") for r in events(records, Event.START)
                    if r.get("restored_step") is not None
                    and int(r["restored_step"]) not in committed_seen]
    if bad_restores:
        return Verdict(False, f"restored step(s) {bad_restores} that were never committed")
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
    return Verdict(True, f"{len(committed_now)} committed checkpoint(s) verify "
                         f"({', '.join(map(str, committed_now))}); restores only from commits "
                         f"({', '.join(map(str, restores)) or 'none'})")


def no_orphans(survivors: Iterable[str]) -> Verdict:
    survivors = list(survivors)
    if survivors:
        return Verdict(False, f"{len(survivors)} process(es) outlived the run: "
                              + ", ".join(survivors[:5]))
    return Verdict(True, "no process of the run is alive")


def world_changed(records: list[Record], reference_world: int) -> bool:
    """Whether any step ran at a world size other than the reference's."""
    return any(int(r.get("world_size", reference_world)) != reference_world
               for r in step_records(records))


def faults_took_effect(fired: list[tuple[str, str | None]], unfired: list[str]) -> Verdict:
    """`fired`: (description, error or None) of every fault that fired, one per node of a wave;
    `unfired`: descriptions of faults that never (wholly) fired."""
    failed = [f"{what}: {error}" for what, error in fired if error]
    if failed:
        return Verdict(False, f"{len(failed)} fault(s) did not take effect: "
                              + "; ".join(failed[:3]))
    if unfired:
        return Verdict(False, f"{len(unfired)} fault(s) never fired: " + "; ".join(unfired[:3]))
    return Verdict(True, f"{len(fired)} fault action(s), each observed to take effect")
