"""Recovery time of the elastic job: node lost, node added, worker hung, node vanished.

Ours (the `c10d-fast` rendezvous with the harness's settings, elastic_train/node/rendezvous.py,
and workers forked warm from each node's prefork server, elastic_train/node/prefork.py) against
two baselines, measured in the same run on the real trainer (tiny model, file storage):

- `torch_default`: torchrun as it comes (its c10d rendezvous defaults, workers started as fresh
  interpreters);
- `stock_c10d_tuned`: torch's own c10d rendezvous at its best integer settings (it takes whole
  seconds: last_call_timeout=1, keep_alive_interval=1, keep_alive_max_attempt=3; 2 attempts
  split a job into two worlds), everything else ours (prefork, watchdog): what tuning alone,
  without our handler, would give.
Recovery = fault -> the first step completed in the new world (metrics.jsonl). Each setting runs
one long job on 2 nodes and repeats, per trial: kill a node (lost), add one (added), SIGSTOP a rank
(hung: the node's watchdog kills it, see elastic_train/node/watchdog.py, and the world re-forms
at 2), freeze a whole node with SIGSTOP (vanished: no reset reaches its peers, they must notice
the silence), add one again (added). The trainer runs with the shipped timeouts and detection
(chaos.harness.HARNESS_TRAIN_DEFAULTS sets only threads and log frequency).

    .venv/bin/python bench/recovery.py [--trials 3] [--out runs/bench-recovery] [--arms ...]

Prints one line per measurement, then a final JSON line with the medians (and, for a vanished
node, the p95). Targets: node lost <= 3 s, node added <= 4 s, hang <= 15 s, node vanished <= 4 s
median and <= 8 s p95 (ours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos.backends import prepared_data
from chaos.cluster import LocalCluster
from chaos.harness import HARNESS_TRAIN_DEFAULTS, default_cache
from chaos.metrics import MetricsTail, is_step
from chaos.soak import percentiles
from elastic_train.node.rendezvous import RendezvousSettings

TARGETS_S = {"node_lost": 3.0, "node_added": 4.0, "worker_hung": 15.0, "node_vanished": 4.0}
P95_TARGETS_S = {"node_vanished": 8.0}
STOCK_C10D_TUNED = RendezvousSettings(
    backend="c10d", poll_interval=None, last_call_timeout=1, first_call_timeout=None,
    keep_alive_interval=1, keep_alive_max_attempt=3, join_timeout=120, save_before_join_s=None)
"""torch's c10d rendezvous at its best whole-second settings (it rejects fractions and zero)."""
ARMS: dict[str, tuple[RendezvousSettings, bool]] = {
    "ours": (RendezvousSettings.fast(), True),
    # Ours without saving before a node joins: the grown world starts sooner but resumes from
    # the newest commit, losing the steps since.
    "ours_no_join_save": (RendezvousSettings(save_before_join_s=0), True),
    "stock_c10d_tuned": (STOCK_C10D_TUNED, True),
    # torchrun as it comes: its rendezvous defaults, workers started cold.
    "torch_default": (RendezvousSettings.torch_default(), False),
}
"""Each arm: rendezvous settings, and whether workers are forked warm (prefork)."""
WAIT_S = 240.0
"""Longest a single recovery may take before the trial counts as failed (None); `--wait-s`."""


class Job:
    """One long training job on a LocalCluster, with helpers to wait for world sizes."""

    def __init__(self, cluster: LocalCluster, metrics: Path, wait_s: float = WAIT_S) -> None:
        self.cluster = cluster
        self.tail = MetricsTail(metrics)
        self.wait_s = wait_s

    def recovered(self, size: int, since: float, steps: int = 1) -> float | None:
        """Time of the `steps`-th step line of the first world of `size` that started after
        `since` (a `start` event, then its steps); None on timeout."""
        deadline = time.time() + self.wait_s
        while time.time() < deadline:
            self.tail.poll()
            started = False
            hits = []
            for r in self.tail.records:
                if float(r.get("time", 0)) <= since:
                    continue
                if r.get("event") == "start":
                    started = int(r.get("world_size", 0)) == size
                    hits = []
                elif started and is_step(r):
                    hits.append(float(r["time"]))
                    if len(hits) >= steps:
                        return hits[steps - 1]
            time.sleep(0.05)
        return None

    def lost_steps(self, since: float) -> int | None:
        """Steps done before the first re-form after `since` that the new world repeats: the
        newest step reported before its `start`, minus the step it restored."""
        last = 0
        for r in self.tail.records:
            if r.get("event") == "start" and float(r["time"]) > since:
                return max(0, last - int(r.get("restored_step") or 0))
            if is_step(r):
                last = int(r["step"])
        return None

    def newest_live(self) -> int:
        return max(self.cluster.live_nodes())


def measure(label: str, settings: RendezvousSettings, trials: int, out: Path,
            cache: Path, prefork: bool = True, wait_s: float = WAIT_S) -> dict[str, list[Any]]:
    overrides = {**HARNESS_TRAIN_DEFAULTS, "model": "tiny", "steps": 1_000_000,
                 "checkpoint.every": 20, "run.dir": str(out / label / "run"),
                 "data.uri": prepared_data(cache),
                 "checkpoint.uri": "file://" + str((out / label / "checkpoints").resolve())}
    args = [f"--{k}={v}" for k, v in overrides.items()]
    results: dict[str, list[float | None]] = {kind: [] for kind in TARGETS_S}
    lost: dict[str, list[int | None]] = {kind: [] for kind in results}

    def record(kind: str, t_fault: float, t_done: float | None, lost_steps: int | None) -> None:
        value = round(t_done - t_fault, 2) if t_done is not None else None
        results[kind].append(value)
        lost[kind].append(lost_steps)
        print(f"{label:>17} {kind:<12} {value if value is not None else 'TIMEOUT'} s, "
              f"{lost_steps} steps lost", flush=True)

    with LocalCluster(out / label / "nodes", ["-m", "elastic_train.train", *args], min_nodes=1,
                      max_nodes=3, rdzv=settings, prefork=prefork) as cluster:
        job = Job(cluster, out / label / "run" / "metrics.jsonl", wait_s)
        for _ in range(2):
            cluster.add_node()
        if job.recovered(2, 0.0, steps=3) is None:
            raise RuntimeError(f"{label}: the job never formed a world of 2 "
                               f"(logs in {out / label / 'nodes'})")

        def fault(kind: str, act: Callable[[], object], world_after: int) -> None:
            t = time.time()
            act()
            done = job.recovered(world_after, t)
            record(kind, t, done, job.lost_steps(t))
            job.recovered(world_after, t, steps=3)  # settle before the next fault

        for _ in range(trials):
            fault("node_lost", lambda: cluster.kill_node(job.newest_live()), 1)
            fault("node_added", cluster.add_node, 2)
            # the watchdog kills the stopped worker; its node restarts it: same world size
            fault("worker_hung", lambda: cluster.hang_worker(job.newest_live()), 2)
            # frozen, not killed: its sockets stay open and its heartbeats stop
            fault("node_vanished", lambda: cluster.vanish_node(job.newest_live()), 1)
            fault("node_added", cluster.add_node, 2)
    return {**results, **{f"{kind}_lost_steps": v for kind, v in lost.items()}}


def stat(values: list[float | None], key: str = "p50") -> float | None:
    """A percentile ("p50", "p95") or the max of the trials that recovered (None: none did)."""
    return percentiles([v for v in values if v is not None])[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-recovery")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="which settings to measure (default: all)")
    parser.add_argument("--wait-s", type=float, default=WAIT_S,
                        help="longest one recovery may take before it counts as failed")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    cache = Path(args.cache) if args.cache else default_cache()
    runs = {}
    for arm in args.arms:
        settings, prefork = ARMS[arm]
        runs[arm] = measure(arm, settings, args.trials, out, cache, prefork=prefork,
                            wait_s=args.wait_s)
    summary: dict[str, object] = {"trials": args.trials}
    for kind, target in TARGETS_S.items():
        medians = {arm: stat(r[kind]) for arm, r in runs.items()}
        ours = medians.get("ours")
        entry: dict[str, object] = {
            "target_s": target,
            "meets_target": (ours is not None and ours <= target) if "ours" in runs else None}
        for arm, r in runs.items():
            entry[f"{arm}_median_s"] = medians[arm]
            entry[f"{arm}_s"] = r[kind]
            entry[f"{arm}_lost_steps"] = r[f"{kind}_lost_steps"]
            if arm != "ours" and ours and medians[arm]:
                entry[f"speedup_over_{arm}"] = round(medians[arm] / ours, 2)
        if kind in P95_TARGETS_S and "ours" in runs:
            ours_p95 = stat(runs["ours"][kind], "p95")
            entry.update(ours_p95_s=ours_p95, p95_target_s=P95_TARGETS_S[kind],
                         meets_p95_target=ours_p95 is not None and
                         ours_p95 <= P95_TARGETS_S[kind])
        summary[kind] = entry
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
