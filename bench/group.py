"""The job-group launch mode: what losing a worker task or the coordinator costs, and goodput of
the group mode against the whole-cluster mode.

Part 1 (measured): three group-mode chaos runs under `chaos.skygroup` (the rendered group YAML run
as SkyPilot runs it; real torchrun agents, S3 on a loopback moto server, the tiny model):
- `chaos/scenarios/group/worker-lost.yaml`: a worker task's node is reclaimed without notice.
  survivors_pause_s = the loss -> the survivors' first step in the smaller world (target <= 3 s);
  join_pause_s = the last step of the smaller world -> the first step of the grown one;
  steps_lost_at_join = the last step the smaller world reached - the step the grown one restored
  (target 0: the joiner waits for a save).
- `chaos/scenarios/group/worker-noticed.yaml`: a worker task's node gets a preemption notice,
  saves and leaves. noticed_pause_s = the last step of the world of 2 -> the first step of the
  smaller one (target <= 3 s); noticed_steps_lost = the last step of the world of 2 - the step
  the smaller one restored (target 0).
- `chaos/scenarios/group/coordinator-lost.yaml`: the coordinator's node is reclaimed; SkyPilot
  re-launches it on a new address. coordinator_cost_s = the replacement coordinator launched ->
  the workers' first step against it (target <= 10 s); committed_steps_lost = the newest commit
  before the loss - the step the workers restored (target 0).

Part 2 (computed): goodput of both modes under one seeded schedule of worker-node losses
(exponential, `--mtbf-h` per node) on `--nodes` nodes for `--hours`, with SkyPilot's recovery
delay simulated: the controller notices a loss at its next 15 s poll (uniform 0..15 s), then a
launch takes `--launch-s` (an assumption: set it to what your cloud takes). Per loss:
- group: the survivors pause `survivors_pause_s`, redo the work since the newest commit, train at
  (N-1)/N until the replacement is up, then pause `join_pause_s` while it joins (no work lost);
- whole cluster (FAILOVER): every node stops, the work since the newest commit is lost, and the
  job restarts `restart_s` after all N nodes are up again; losses meanwhile cost nothing more.
Goodput = useful node-seconds / (N x wall). Work since the newest commit: uniform in
[0, `--commit-every-s`).

    .venv/bin/python bench/group.py [--out runs/bench-group] [--launch-s 60]
    .venv/bin/python bench/group.py --skip-runs   # part 2 from the defaults below only

Prints one line per figure, then a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from chaos import skygroup
from chaos.metrics import Record, events, step_records

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "chaos" / "scenarios" / "group"
TARGETS = {"survivors_pause_s": 3.0, "steps_lost_at_join": 0, "noticed_pause_s": 3.0,
           "noticed_steps_lost": 0, "coordinator_cost_s": 10.0, "committed_steps_lost": 0}
DEFAULTS = {"survivors_pause_s": 3.0, "join_pause_s": 4.5, "restart_s": 30.0}
"""Part 2's inputs when part 1 is skipped: the targets, and a whole-cluster restart (setup,
torchrun, restore) of 30 s."""


def _wall(run: skygroup.GroupRun, event: str, task: str, nth: int = 0) -> float:
    return [e["wall"] for e in run.events if e["event"] == event and e["task"] == task][nth]


def _steps_after(records: list[Record], t: float) -> list[Record]:
    return [r for r in step_records(records) if float(r["time"]) > t]


def worker_lost_figures(run: skygroup.GroupRun) -> dict[str, float]:
    records = run.records
    lost_at = _wall(run, "preempted", "w1")
    survivors_first = _steps_after(records, lost_at)[0]
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    grown = max(i for i in starts if int(records[i]["world_size"]) == 2)
    before = step_records(records[:grown])
    after = step_records(records[grown:])
    return {
        "survivors_pause_s": round(float(survivors_first["time"]) - lost_at, 3),
        "join_pause_s": round(float(after[0]["time"]) - float(before[-1]["time"]), 3),
        "steps_lost_at_join": max(int(r["step"]) for r in before)
        - int(records[grown]["restored_step"]),
        "restart_s": round(float(step_records(records)[0]["time"])
                           - _wall(run, "launched", "w0"), 3),
    }


def worker_noticed_figures(run: skygroup.GroupRun) -> dict[str, float]:
    records = run.records
    shrunk = min(i for i, r in enumerate(records) if r.get("event") == "start"
                 and int(r["world_size"]) == 1)
    before = step_records(records[:shrunk])
    after = step_records(records[shrunk:])
    return {
        "noticed_pause_s": round(float(after[0]["time"]) - float(before[-1]["time"]), 3),
        "noticed_steps_lost": max(int(r["step"]) for r in before)
        - int(records[shrunk]["restored_step"]),
    }


def coordinator_lost_figures(run: skygroup.GroupRun) -> dict[str, float]:
    records = run.records
    lost_at = _wall(run, "preempted", "coord")
    back_at = _wall(run, "launched", "coord", 1)
    commits = [int(r["step"]) for r in events(records, "commit") if float(r["time"]) < lost_at]
    restarts = [r for r in events(records, "start") if float(r["time"]) > lost_at]
    return {
        "coordinator_cost_s": round(float(_steps_after(records, back_at)[0]["time"]) - back_at,
                                    3),
        "committed_steps_lost": max(commits, default=0) - int(restarts[0]["restored_step"] or 0),
    }


def losses(nodes: int, hours: float, mtbf_h: float, seed: int) -> list[float]:
    """Seconds at which some worker node is lost: each node fails as a Poisson process."""
    rng = random.Random(seed)
    horizon = hours * 3600
    found: list[float] = []
    for _ in range(nodes):
        t = rng.expovariate(1 / (mtbf_h * 3600))
        while t < horizon:
            found.append(t)
            t += rng.expovariate(1 / (mtbf_h * 3600))
    return sorted(found)


def goodput(mode: str, schedule: list[float], nodes: int, hours: float, launch_s: float,
            commit_every_s: float, figures: dict[str, float], seed: int) -> float:
    """Useful node-seconds / (nodes x wall) for `mode` ("group" or "cluster"); the same `seed`
    draws the same poll phases and commit ages for both modes."""
    rng = random.Random(seed + 1)
    horizon = hours * 3600
    lost = 0.0  # node-seconds without useful work
    busy_until = 0.0  # cluster mode: down (being recovered) until then
    for t in schedule:
        delay = rng.uniform(0, skygroup.JOB_STATUS_CHECK_GAP_S) + launch_s
        redo = rng.uniform(0, commit_every_s)
        if mode == "cluster":
            if t < busy_until:
                continue  # the whole cluster is being relaunched anyway
            down = min(delay + figures["restart_s"], horizon - t)
            lost += nodes * (min(redo, t) + down)
            busy_until = t + down
        else:
            survivors = nodes - 1
            lost += survivors * (figures["survivors_pause_s"] + min(redo, t))
            lost += min(delay, horizon - t)  # the lost node's share until it is back
            lost += nodes * figures["join_pause_s"]
    return max(0.0, 1 - lost / (nodes * horizon))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-group")
    parser.add_argument("--skip-runs", action="store_true", help="part 2 only, from defaults")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--mtbf-h", type=float, default=6.0, help="mean hours between losses "
                        "of one spot node")
    parser.add_argument("--launch-s", type=float, default=skygroup.LAUNCH_S)
    parser.add_argument("--commit-every-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    figures: dict[str, Any] = dict(DEFAULTS)
    if not args.skip_runs:
        for name, measure in (("worker-lost", worker_lost_figures),
                              ("worker-noticed", worker_noticed_figures),
                              ("coordinator-lost", coordinator_lost_figures)):
            scenario = skygroup.load_scenario(SCENARIOS / f"{name}.yaml")
            run = skygroup.run_scenario(scenario, args.out / name, timeout_s=args.timeout,
                                        log=lambda m: print(f"  {m}", file=sys.stderr))
            failed = [k for k, v in run.report["invariants"].items() if not v["ok"]]
            if failed or not run.report["finished"]:
                print(f"{name}: the run failed {failed or 'to finish'}; see {args.out / name}",
                      file=sys.stderr)
                return 1
            found = measure(run)
            figures.update(found)
            for key, value in found.items():
                target = TARGETS.get(key)
                print(f"{name}: {key} = {value}" + (f" (target <= {target})"
                                                    if target is not None else ""))
    schedule = losses(args.nodes, args.hours, args.mtbf_h, args.seed)
    group = goodput("group", schedule, args.nodes, args.hours, args.launch_s,
                    args.commit_every_s, figures, args.seed)
    cluster = goodput("cluster", schedule, args.nodes, args.hours, args.launch_s,
                      args.commit_every_s, figures, args.seed)
    print(f"goodput over {args.hours:g} h, {args.nodes} nodes, {len(schedule)} losses "
          f"(seed {args.seed}, launch {args.launch_s:g} s): group {group:.4f}, "
          f"whole cluster {cluster:.4f}")
    print(json.dumps({"bench": "group", **figures, "losses": len(schedule), "nodes": args.nodes,
                      "hours": args.hours, "mtbf_h": args.mtbf_h, "launch_s": args.launch_s,
                      "commit_every_s": args.commit_every_s, "seed": args.seed,
                      "goodput_group": round(group, 4), "goodput_cluster": round(cluster, 4),
                      "group_minus_cluster": round(group - cluster, 4), "targets": TARGETS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
