"""Run one chaos scenario end to end: reference, cluster, faults, invariants, report.

`run_scenario(scenario, options)`:

1. Prepares storage (`backends`) and the fault-free reference run (`reference`), cached by the
   trainer's config digest, the world size and the trainer's source.
2. Starts the local cluster with `scenario.nodes` nodes, tails metrics.jsonl, and lets the
   injector fire the faults as the run reports steps; prints progress as it goes.
3. Stops when the run is done, or at once when every node is gone (faults still pending then can
   never fire: they are reported), or when the timeout passes; kills whatever is left (the frozen
   processes of vanished nodes included), checks the invariants and writes `{out}/report.json`
   and `{out}/timeline.png`.

It never raises for a failed run: a run that does not finish is a report with `completed` false.
It raises `HarnessError` only when it cannot run at all (e.g. the reference run failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import invariants, report
from chaos.backends import Backend, environ, open_backend, prepared_data
from chaos.cluster import NODE_ENV, TAG_ENV, LocalCluster
from chaos.faults import Fired, Injector, draw_faults
from chaos.metrics import MetricsTail, Record, events, is_step, step_records
from chaos.scenario import Scenario, ScenarioError
from elastic_train.events import Event

HARNESS_TRAIN_DEFAULTS: dict[str, Any] = {
    # Only what this machine needs. Timeouts, hang detection and retries are the shipped
    # defaults: a chaos run proves the settings users get. (Loopback rendezvous timings are the
    # cluster's, `LocalCluster`: nodes on one machine reach the store in microseconds.)
    #
    # One torch thread per worker: several workers share the machine's cores, and more threads
    # than cores make every step of every rank slower.
    "run.threads": 1,
    # Node logs stay short; the harness prints its own progress from metrics.jsonl.
    "run.log_every": 50,
}
"""Trainer overrides the harness sets unless the scenario's `train` sets them."""

DONE_GRACE_S = 20.0
"""After the `done` event: how long agents may take to exit (torchrun's exit barrier). A node
added too late to join the final world would wait in the rendezvous; it is killed after this."""


class HarnessError(RuntimeError):
    """The harness could not run the scenario at all (not: the run failed an invariant)."""


@dataclass
class Options:
    out: Path
    seed: int | None = None
    """Overrides the scenario's seed (node choices, random faults)."""
    random_faults: int | None = None
    """Draw this many faults from the seed instead of the scenario's."""
    timeout_s: float = 600.0
    """The chaos run (not the reference) is stopped after this; it then fails `completed`."""
    cache: Path = field(default_factory=lambda: default_cache())
    log: Callable[[str], None] = print


def default_cache() -> Path:
    """ELASTIC_TRAIN_CHAOS_CACHE, else ~/.cache/elastic-train/chaos: prepared data, references."""
    env = os.environ.get("ELASTIC_TRAIN_CHAOS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "elastic-train" / "chaos"


def train_overrides(scenario: Scenario) -> dict[str, Any]:
    return {**HARNESS_TRAIN_DEFAULTS, **scenario.train}


def _args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


# ------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    dir: Path
    world_size: int
    wall_s: float
    consumed: list[str | None]
    """consumed[s - 1]: the step line's `consumed` at step s (what the ranks trained on)."""
    losses: list[float | None]
    """losses[s - 1]: the loss of step s."""

    @property
    def final_model(self) -> Path:
        return self.dir / "run" / "final_model.pt"

    @property
    def step_time_s(self) -> float:
        """Fault-free seconds per step, start-up included (wall time / steps)."""
        return self.wall_s / max(1, len(self.consumed))


def _source_digest() -> str:
    """Hash of the trainer's and checkpointing's source: a cached reference from other code is
    not a reference."""
    import checkpointing
    import elastic_train

    h = hashlib.sha256()
    for pkg in (elastic_train, checkpointing):
        for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def reference_key(scenario: Scenario) -> str:
    from elastic_train import config as config_lib

    cfg = config_lib.load(None, {k: str(v) for k, v in train_overrides(scenario).items()})
    world = scenario.nodes * scenario.procs_per_node
    return f"{cfg.digest()}-w{world}-{_source_digest()}"


def reference(scenario: Scenario, cache: Path, log: Callable[[str], None] = print) -> Reference:
    """The fault-free run of the scenario's trainer config at its starting world size (same
    nodes and processes per node, file storage), from the cache or run now.

    Raises HarnessError when the reference run does not complete."""
    key = reference_key(scenario)
    world = scenario.nodes * scenario.procs_per_node
    ref_dir = cache / "references" / key
    meta = ref_dir / "reference.json"
    if meta.exists() and (ref_dir / "run" / "final_model.pt").exists():
        m = json.loads(meta.read_text())
        if "consumed" in m and "losses" in m:
            return Reference(ref_dir, m["world_size"], m["wall_s"], m["consumed"], m["losses"])
    log(f"reference run (no faults, world {world}) for config {key} ...")
    tmp = cache / "references" / f".{key}.{uuid.uuid4().hex[:6]}"
    data_uri = prepared_data(cache)
    overrides = {**train_overrides(scenario), "run.dir": str(tmp / "run"),
                 "checkpoint.uri": "file://" + str((tmp / "checkpoints").resolve()),
                 "data.uri": data_uri}
    t0 = time.time()
    with LocalCluster(tmp / "nodes", ["-m", "elastic_train.train", *_args(overrides)],
                      min_nodes=scenario.nodes, max_nodes=scenario.nodes,
                      procs_per_node=scenario.procs_per_node) as cluster:
        for _ in range(scenario.nodes):
            cluster.add_node()
        finished = cluster.wait(timeout_s=max(300.0, scenario.steps * 2.0))
        codes = cluster.exit_codes()
    wall = time.time() - t0
    records = MetricsTail(tmp / "run" / "metrics.jsonl")
    records.poll()
    steps = step_records(records.records)
    if not finished or any(codes.values()) or not events(records.records, Event.DONE):
        raise HarnessError(f"the reference run failed (exit codes {codes}); logs in {tmp}/nodes")
    consumed: list[str | None] = [None] * scenario.steps
    losses: list[float | None] = [None] * scenario.steps
    for r in steps:
        consumed[int(r["step"]) - 1] = r.get("consumed")
        losses[int(r["step"]) - 1] = r.get("loss")
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    (tmp / "reference.json").write_text(json.dumps(
        {"world_size": world, "wall_s": wall, "consumed": consumed, "losses": losses,
         "key": key}))
    shutil.rmtree(ref_dir, ignore_errors=True)
    os.replace(tmp, ref_dir)
    log(f"reference done in {wall:.1f} s")
    return Reference(ref_dir, world, wall, consumed, losses)


# ------------------------------------------------------------------------------------- the run


class _Progress:
    """Live progress lines: events at once, steps at most every `every_s` seconds."""

    def __init__(self, log: Callable[[str], None], t0: float, steps: int,
                 every_s: float = 2.0) -> None:
        self.log, self.t0, self.steps, self.every_s = log, t0, steps, every_s
        self._last = 0.0

    def say(self, text: str) -> None:
        self.log(f"[{time.time() - self.t0:6.1f}s] {text}")

    def records(self, new: list[Record]) -> None:
        for r in new:
            name = r.get("event")
            if name == Event.START:
                restored = r.get("restored_step")
                self.say(f"world of {r.get('world_size')} started from "
                         f"{'step ' + str(restored) if restored is not None else 'scratch'}")
            elif name in (Event.COMMIT, Event.SAVE_FAILED, Event.NOTICE, Event.DONE):
                extra = f" ({r.get('error')})" if name == Event.SAVE_FAILED else ""
                self.say(f"{name} step {r.get('step')}{extra}")
        steps = [r for r in new if is_step(r)]
        if steps and (time.time() - self._last >= self.every_s or
                      int(steps[-1]["step"]) == self.steps):
            self._last = time.time()
            r = steps[-1]
            self.say(f"step {r['step']}/{self.steps} loss {float(r.get('loss', 0)):.3f} "
                     f"world {r.get('world_size')}")


def _check_train_config(scenario: Scenario) -> None:
    """Raise ScenarioError (one line) if the trainer would refuse the scenario's `train:` keys."""
    from elastic_train import config as config_lib

    try:
        config_lib.load(None, config_lib.parse_overrides(_args(train_overrides(scenario))))
    except config_lib.ConfigError as e:
        raise ScenarioError(f"train: {e}") from None


def clean_out(out: Path, dirs: tuple[str, ...] = ("run", "nodes", "checkpoints"),
              files: tuple[str, ...] = ("report.json", "timeline.png")) -> None:
    """Remove what an earlier run left in `out`: only the names a run writes there (`dirs` and
    `files`), so that its metrics, logs and report are never read as this run's. Call it once
    the scenario is known to be valid: a bad one leaves the previous run's results alone."""
    for name in dirs:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in files:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _checkpoint_state(scenario: Scenario, backend: Backend) -> Callable[[], dict[str, Any]]:
    """A factory of what a checkpoint of this scenario's trainer holds (a fresh model, unsharded,
    and the trainer's entry), for loading one in this process. Reads the dataset's index (its
    vocabulary) with the backend's storage options: this process's fsspec was configured before
    the backend's environment existed."""
    import fsspec

    from checkpointing import ModelOptimizerState
    from elastic_train import config as config_lib
    from elastic_train.data import INDEX
    from elastic_train.spec import fresh_model, resolve

    cfg = config_lib.load(None, {k: str(v) for k, v in train_overrides(scenario).items()})
    spec = resolve(cfg.model)
    vocab = None
    if spec.dataset is None:
        fs, root = fsspec.core.url_to_fs(backend.data_uri, **backend.storage_options)
        vocab = int(json.loads(fs.cat_file(f"{root}/{INDEX}"))["vocab_size"])

    def build() -> dict[str, Any]:
        model = fresh_model(spec, cfg, vocab)
        return {"app": ModelOptimizerState(model), "trainer": {"step": -1, "config_digest": ""}}

    return build


def _verifier(backend: Backend, scenario: Scenario
              ) -> tuple[list[int], Callable[[int], tuple[bool, str]]]:
    """The committed steps in storage, and for each whether it verifies and loads."""
    from checkpointing import CheckpointManager

    with environ(backend.env):
        build_state = _checkpoint_state(scenario, backend)
        manager = CheckpointManager(backend.checkpoint_uri,
                                    storage_options=backend.storage_options)
        try:
            steps = [info.step for info in manager.steps()]
            results = {step: invariants.load_checkpoint(manager, step, build_state)
                       for step in steps}
        finally:
            manager.close()
    return steps, lambda step: results[step]


ORPHAN_GRACE_S = 10.0
"""How long a node's processes may outlive its agent before they count as orphans (a prefork
server notices its parent is gone on its next poll)."""


def _agents_and_orphans(cluster: LocalCluster, fired: list[Fired], records: list[Record],
                        completed: bool) -> dict[str, invariants.Verdict]:
    """`agents_exited` and `no_orphans`, from what is alive now, before the harness kills
    anything: processes of a node whose agent has exited (or was killed by a fault) that are
    still alive after ORPHAN_GRACE_S. A vanished (frozen) node is not asked this."""
    from elastic_train.node import procs

    last_start = max((float(r["time"]) for r in events(records, Event.START)), default=0.0)
    added_late = {f.node for f in fired if f.fault.kind == "add_node" and f.time > last_start}
    noticed = {f.node for f in fired if f.fault.kind == "preempt_node"}
    agents = [invariants.AgentEnd(node=n.index, code=n.agent.poll(),
                                  removed=n.removed is not None, noticed=n.index in noticed,
                                  joined_final_world=n.index not in added_late)
              for n in cluster.nodes]
    # A vanished node's processes are frozen on purpose, as a reclaimed VM's would be (they
    # never run again); they are reaped with the cluster, and the check after it covers them.
    vanished = {str(n.index) for n in cluster.nodes if getattr(n, "frozen", None)}
    ended = {str(a.node) for a in agents if a.code is not None or a.removed} - vanished
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while True:
        orphans = [p for p in procs.tagged({TAG_ENV: cluster.tag})
                   if _environ(p).get(NODE_ENV) in ended]
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    survivors = []
    for p in orphans:
        with contextlib.suppress(Exception):
            survivors.append(f"{p.pid} (node {_environ(p).get(NODE_ENV)}) "
                             + " ".join(p.cmdline()[:4]))
    return {"no_orphans": invariants.no_orphans(survivors),
            "agents_exited": invariants.agents_exited(agents, completed)}


def _environ(proc: Any) -> dict[str, str]:
    try:
        return proc.environ()
    except Exception:  # gone meanwhile, or not ours to read
        return {}


def _outage_hits(backend: Backend) -> Callable[[float, float], int] | None:
    """Counts the requests the storage proxy failed between two times (None without a proxy)."""
    proxy = getattr(backend.outage, "__self__", None)
    if proxy is None:
        return None
    return lambda t0, t1: sum(1 for f in proxy.fired if t0 <= f.time <= t1)


def outcome_checks(records: list[Record], steps: int, final_model: Path, ref: Reference,
                   committed: list[int], verify: Callable[[int], tuple[bool, str]],
                   committed_during: Iterable[int] = ()) -> dict[str, invariants.Verdict]:
    """The invariants on what a run produced, against its fault-free reference: every way of
    running one (the local cluster, a SkyPilot job group, sky/train.yaml's `run:`) checks these,
    then adds what it knows of its own processes and faults."""
    changed = invariants.world_changed(records, ref.world_size)
    return {
        "completed": invariants.completed(records, steps, final_model),
        "exactly_once": invariants.exactly_once(records, ref.consumed, steps),
        "losses_match_reference": invariants.losses_match(records, ref.losses, ref.world_size,
                                                          steps),
        "weights_match_reference": invariants.weights_match(final_model, ref.final_model,
                                                            changed),
        "checkpoints_verified": invariants.checkpoints_verified(records, committed, verify,
                                                                committed_during),
    }


class CommitWatcher:
    """The steps seen committed in storage while a run trains, polled every POLL_S straight from
    the storage server (not through the fault proxy). A restore is judged against these too: a
    rank 0 killed between a commit and its `commit` event leaves no event, and garbage
    collection may have removed the step by the end. Use as a context manager."""

    POLL_S = 1.0

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        from checkpointing.storage import Storage

        self.storage = Storage(uri, storage_options, retry_timeout_s=2)
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="commit-watcher", daemon=True)

    def _poll(self) -> None:
        from checkpointing.commit import list_steps

        while not self._stop.wait(self.POLL_S):
            try:
                self.seen |= {info.step for info in list_steps(self.storage).committed}
            except Exception:  # noqa: BLE001 - an unreadable moment; the next poll tries again
                continue

    def __enter__(self) -> CommitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_scenario(scenario: Scenario, options: Options) -> dict[str, Any]:
    """Run `scenario` and return its report (also written to `{out}/report.json`)."""
    log = options.log
    out = options.out.resolve()
    if options.seed is not None:
        scenario = dataclasses.replace(scenario, seed=options.seed)
    if options.random_faults is not None:
        faults = draw_faults(scenario, options.random_faults, scenario.seed)
        scenario = scenario.with_faults(faults)
        log(f"random faults (seed {scenario.seed}): "
            + "; ".join(f.describe() for f in faults))
    _check_train_config(scenario)
    # Only now, with everything about the scenario checked, do the earlier results go.
    clean_out(out)
    options.cache.mkdir(parents=True, exist_ok=True)
    ref = reference(scenario, options.cache, log)

    run_dir = out / "run"
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(open_backend(scenario.storage, out, options.cache))
        overrides = {**train_overrides(scenario), "run.dir": str(run_dir),
                     "checkpoint.uri": backend.checkpoint_uri, "data.uri": backend.data_uri}
        cluster = stack.enter_context(LocalCluster(
            out / "nodes", ["-m", "elastic_train.train", *_args(overrides)],
            min_nodes=scenario.min_nodes, max_nodes=scenario.max_nodes,
            procs_per_node=scenario.procs_per_node, env=backend.env, first_world=scenario.nodes))
        watcher = stack.enter_context(CommitWatcher(backend.checkpoint_uri,
                                                    backend.storage_options))
        tail = MetricsTail(run_dir / "metrics.jsonl")
        t0 = time.time()
        progress = _Progress(log, t0, scenario.steps)
        injector = Injector(scenario.faults, cluster, checkpoint_every=scenario.checkpoint_every,
                            steps=scenario.steps, outage=backend.outage, log=progress.say,
                            seed=scenario.seed)
        cluster.on_node_removed.append(injector.node_removed)
        progress.say(f"scenario {scenario.name}: {scenario.nodes} node(s) x "
                     f"{scenario.procs_per_node}, storage {scenario.storage}, "
                     f"{len(scenario.faults)} fault(s), {scenario.steps} steps")
        for _ in range(scenario.nodes):
            cluster.add_node()
        outcome = _drive(cluster, tail, injector, progress, t0, options.timeout_s)
        wall = time.time() - t0
        tail.poll()
        # Before cleanup: what the run left behind is the run's doing, not the harness's.
        exited = _agents_and_orphans(cluster, injector.fired, tail.records,
                                     bool(events(tail.records, Event.DONE)))
        exit_codes = cluster.exit_codes()
        for f in injector.fired:  # an added node may join in a re-form that also lost one
            if f.fault.kind == "add_node" and f.node is not None:
                joined_at = cluster.workers_started_at(f.node)
                f.detail["joined"] = joined_at is not None
                if joined_at is not None:
                    f.detail["joined_at"] = joined_at
                    f.detail["joining_at"] = cluster.joining_at(f.node)
        cluster.close()
        tail.poll()
        records = tail.records
        try:
            committed, verify = _verifier(backend, scenario)
        except Exception as e:  # storage unreachable: the invariant fails, the report is written
            committed, verify = [], (lambda step, e=e: (False, str(e)))
            log(f"could not list checkpoints: {e}")
        outage_hits = _outage_hits(backend)
    # What the harness's own cleanup could not kill, and storage servers that outlived it.
    left = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in cluster.tagged_processes()]
    left += [str(pid) for pid in backend.pids if _alive(pid)]
    if left:
        exited["no_orphans"] = invariants.no_orphans(left)

    final_model = run_dir / "final_model.pt"
    changed = invariants.world_changed(records, ref.world_size)
    checks = {
        **outcome_checks(records, scenario.steps, final_model, ref, committed, verify,
                         watcher.seen),
        **exited,
        "faults_observed": invariants.faults_observed(
            injector.fired, records, outage_hits, [f.describe() for f in injector.unfired()]),
    }
    done = events(records, Event.DONE)
    final_step = max((int(r["step"]) for r in step_records(records)), default=0)
    faults = report.summarize_faults(injector.fired, records, t0)
    for entry, fired in zip(faults, injector.fired, strict=True):
        missed = invariants.fault_effects([fired], records, outage_hits)
        entry["observed"] = not missed
        if missed:
            entry["not_observed"] = missed[0]
    rep: dict[str, Any] = {
        "scenario": scenario.to_dict(),
        "completed": bool(done) and checks["completed"].ok,
        "final_step": final_step,
        "wall_s": round(wall, 3),
        "goodput": round(ref.step_time_s * scenario.steps / wall, 4) if wall > 0 else 0.0,
        "invariants": {k: v.as_dict() for k, v in checks.items()},
        "faults": faults,
        "run_uri": backend.checkpoint_uri,
        "outcome": outcome,
        "faults_not_fired": [f.to_dict() for f in injector.unfired()],
        "reference": {"key": reference_key(scenario), "world_size": ref.world_size,
                      "wall_s": round(ref.wall_s, 3), "step_time_s": round(ref.step_time_s, 4)},
        "weights_tolerance": {"world_changed": changed, "rtol_l2": invariants.WEIGHTS_RTOL},
        "exit_codes": {str(k): v for k, v in exit_codes.items()},
        "seed": scenario.seed,
        "random_faults": options.random_faults,
        "metrics_path": str(run_dir / "metrics.jsonl"),
        "logs_dir": str(out / "nodes"),
    }
    report.write(rep, out)
    try:
        report.plot_timeline(records, faults, t0, scenario.steps, out / "timeline.png",
                             f"{scenario.name}: {scenario.storage}, {scenario.nodes} nodes")
    except Exception as e:  # a plot must not lose the report
        log(f"timeline plot failed: {e}")
    return rep


def _drive(cluster: LocalCluster, tail: MetricsTail, injector: Injector, progress: _Progress,
           t0: float, timeout_s: float) -> str:
    """Poll metrics and fire faults until the run ends; returns how it ended."""
    done_at: float | None = None
    while True:
        new = tail.poll()
        progress.records(new)
        injector.observe(new)
        if done_at is None and events(new, Event.DONE):
            done_at = time.time()
        live = cluster.live_nodes()
        if done_at is not None and (not live or time.time() - done_at > DONE_GRACE_S):
            return "done"
        if not live:
            # Nothing trains, so no step comes that a pending fault (an add_node at a later step
            # included) could wait for: waiting for the timeout would only hide the failure.
            progress.records(tail.poll())
            if events(tail.records, Event.DONE):
                return "done"
            pending = injector.unfired()
            left = (f"; {len(pending)} fault(s) can no longer fire: "
                    + "; ".join(f.describe() for f in pending)) if pending else ""
            progress.say(f"every node is gone (exit codes {cluster.exit_codes()}){left}")
            return "no nodes left"
        if time.time() - t0 > timeout_s:
            progress.say(f"timed out after {timeout_s:.0f} s")
            return "timed out"
        time.sleep(0.02 if injector.armed_during else 0.1)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

