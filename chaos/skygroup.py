"""A rendered SkyPilot job-group YAML run the way SkyPilot 0.14.1 would run it, on this machine.

`SkyGroup` runs each task's `run:` as its own "cluster": a shell in a session of its own, with a
HOME of its own (a fresh one for each new cluster, as a new VM has an empty disk), under the
task's `envs` and the `SKYPILOT_*` variables SkyPilot's jobs controller and skylet set for a
job-group task: one node each (SKYPILOT_NODE_RANK=0, SKYPILOT_NUM_NODES=1, SKYPILOT_NODE_IPS its
own address), one SKYPILOT_MANAGED_JOB_ID for the whole group, a distinct SKYPILOT_TASK_ID per
task (`sky-managed-<time>_<group>_<task>_<job id>-<index>`), SKYPILOT_TASK_IDS,
SKYPILOT_JOBGROUP_NAME, SKYPILOT_ROOT_JOB_ID.

A simulated jobs controller watches every task on its own, as SkyPilot's does:
- a task whose cluster was lost (preempted) is re-launched alone on a new cluster after
  `recovery_delay_s` (SkyPilot: its status poll, every `JOB_STATUS_CHECK_GAP_S`, plus a launch);
- a task that exited with a code in its `recover_on_exit_codes` is re-run on its cluster after
  `restart_delay_s`; another failure does the same while `max_restarts_on_errors` allows, then the
  task has FAILED; exit 0 is SUCCEEDED;
- once every primary task has ended, the other tasks (the coordinator) are cancelled after the
  header's `termination_delay`.

Faults (`preempt`, `kill`) act on a task's whole cluster, the way a cloud would. `run_scenario`
runs a group scenario (`chaos/scenarios/group/*.yaml`, see `load_scenario`) end to end against
the harness's fault-free reference and checks the same five invariants as every chaos run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from chaos import harness, invariants
from chaos.backends import open_backend
from chaos.cluster import NODE_ENV, TAG_ENV
from chaos.metrics import MetricsTail, Record, step_records
from chaos.scenario import Scenario, ScenarioError
from elastic_train.node import procs
from elastic_train.node.launch import NOTICE_FILE

ROOT = Path(__file__).resolve().parents[1]
JOB_STATUS_CHECK_GAP_S = 15.0
"""SkyPilot 0.14.1's controller polls each task's status this often
(`sky.jobs.utils.JOB_STATUS_CHECK_GAP_SECONDS`; tests/test_sky_group.py keeps them equal)."""
LAUNCH_S = 60.0
"""Simulated time to provision and set up a replacement spot node (an assumption, not a
measurement: set `recovery_delay_s` to what your cloud takes)."""
DEFAULT_RECOVERY_DELAY_S = JOB_STATUS_CHECK_GAP_S + LAUNCH_S
DEFAULT_RESTART_DELAY_S = JOB_STATUS_CHECK_GAP_S
"""A failed task re-run on its own cluster: no launch, only the poll."""
TERMINAL = ("SUCCEEDED", "FAILED")


@dataclass
class GroupTask:
    """One task of the group and the state the simulated controller keeps for it."""

    index: int
    name: str
    run: str
    envs: dict[str, str]
    recover_codes: tuple[int, ...]
    max_restarts_on_errors: int
    primary: bool
    task_id: str = ""
    cluster: int = 0
    """How many clusters this task has had (a preemption makes a new one)."""
    shell: subprocess.Popen[bytes] | None = None
    status: str = "PENDING"
    restarts_on_errors: int = 0
    relaunch_at: float | None = None
    lost: bool = False
    """Set by a fault: the cluster is gone, so the next run is on a new one."""
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.shell is not None and self.shell.poll() is None


class SkyGroup:
    """The tasks of a job-group YAML, run and recovered as SkyPilot would (module docstring).

    `envs` override every task's envs (as `sky jobs launch --env` does); `extra_env` is the
    machine's environment (storage endpoints). Use as a context manager: `close()` kills every
    process of every task, found through the tree and the chaos tag they inherit."""

    def __init__(self, yaml_path: Path, envs: dict[str, str], extra_env: dict[str, str],
                 workdir: Path, recovery_delay_s: float = DEFAULT_RECOVERY_DELAY_S,
                 restart_delay_s: float = DEFAULT_RESTART_DELAY_S, job_id: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        docs = [d for d in yaml.safe_load_all(Path(yaml_path).read_text()) if d]
        header, tasks = docs[0], docs[1:]
        self.name = str(header["name"])
        primary = header.get("primary_tasks") or [t["name"] for t in tasks]
        self.termination_delay_s = _seconds(header.get("termination_delay", "0"))
        self.job_id = str(job_id)
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
        self.tasks: dict[str, GroupTask] = {}
        for i, doc in enumerate(tasks):
            recovery = (doc.get("resources") or {}).get("job_recovery") or {}
            codes = recovery.get("recover_on_exit_codes") or []
            merged = {**(doc.get("envs") or {}), **envs}
            missing = [k for k, v in merged.items() if v is None]
            if missing:
                raise ValueError(f"task {doc['name']}: required envs not given: {missing}")
            self.tasks[doc["name"]] = GroupTask(
                index=i, name=doc["name"], run=doc["run"],
                envs={k: str(v) for k, v in merged.items()},
                recover_codes=tuple([codes] if isinstance(codes, int) else codes),
                max_restarts_on_errors=int(recovery.get("max_restarts_on_errors", 0)),
                primary=doc["name"] in primary,
                task_id=f"sky-managed-{stamp}_{self.name}_{doc['name']}_{self.job_id}-{i}")
        self.extra_env = extra_env
        self.workdir = Path(workdir)
        self.recovery_delay_s = recovery_delay_s
        self.restart_delay_s = restart_delay_s
        self.clock = clock
        self.tag = uuid.uuid4().hex[:12]
        self.events: list[dict[str, Any]] = []
        """What happened, in order: {"t", "event", "task", ...} (t: `clock()`)."""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ended_at: float | None = None
        self._controller = threading.Thread(target=self._control, name="sky-controller",
                                            daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> SkyGroup:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for task in self.tasks.values():
                self._launch(task, new_cluster=True)
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the controller, then kill every task's processes (safe to call twice)."""
        self._stop.set()
        if self._controller.is_alive():
            self._controller.join(timeout=5)
        for task in self.tasks.values():
            self._kill(task)
        procs.kill(procs.tagged({TAG_ENV: self.tag}))

    def done(self) -> bool:
        """Every primary task has ended (SUCCEEDED or FAILED)."""
        return all(t.status in TERMINAL for t in self.tasks.values() if t.primary)

    def wait(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.done():
                return True
            time.sleep(poll_s)
        return self.done()

    def statuses(self) -> dict[str, str]:
        return {name: t.status for name, t in self.tasks.items()}

    def tagged(self) -> list[psutil.Process]:
        return procs.tagged({TAG_ENV: self.tag})

    def outlived(self, timeout_s: float = 15.0, poll_s: float = 0.1) -> list[psutil.Process]:
        """The processes of this group still alive once every task has ended (the primary ones
        by themselves, the others cancelled by the controller): what a task left behind. Waits
        up to `timeout_s` for the tasks to end and for the processes of those that did to go;
        a task still running then counts with its processes. Call it before `close()`, which
        kills them all."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                ended = all(t.status in (*TERMINAL, "CANCELLED")
                            and (t.shell is None or t.shell.poll() is not None)
                            for t in self.tasks.values())
            if ended and not self.tagged():
                break
            time.sleep(poll_s)
        return self.tagged()

    def logs(self, limit: int = 3000) -> str:
        return "\n".join(f"--- {name}.log\n" + _tail(self.workdir / f"{name}.log", limit)
                         for name in self.tasks)

    # -- faults ---------------------------------------------------------------------------
    def preempt(self, name: str, notice_s: float | None = None) -> None:
        """The cloud takes the task's node: with `notice_s`, its notice file appears first and
        the node goes `notice_s` seconds later; without, at once. SkyPilot then re-launches the
        task on a new cluster. Returns at once."""
        task = self.tasks[name]
        if notice_s is None:
            self._lose(task, "preempted")
            return
        notice = self._home(task) / NOTICE_FILE.removeprefix("~/")
        notice.parent.mkdir(parents=True, exist_ok=True)
        notice.write_text(json.dumps({"source": "chaos", "deadline": time.time() + notice_s}))
        self._record("notice", task, notice_s=notice_s)
        timer = threading.Timer(notice_s, self._lose, (task, "preempted"))
        timer.daemon = True
        timer.start()

    def kill(self, name: str) -> None:
        """Every process of the task dies at once (its node stays): SkyPilot sees the job fail
        and restarts it on the same cluster while its `max_restarts_on_errors` allows."""
        task = self.tasks[name]
        self._record("killed", task)
        self._kill(task)

    # -- the simulated controller ---------------------------------------------------------
    def _lose(self, task: GroupTask, why: str) -> None:
        """The task's node is gone. A worker's is frozen, as a reclaimed VM looks to its peers
        (sockets open, heartbeats stopped, no reset), and reaped when its replacement launches;
        the controller starts the recovery clock at once, as its status poll would find the
        cluster gone. The coordinator's is killed instead: on loopback a frozen listener still
        completes TCP handshakes, which a vanished VM does not, while a killed one refuses them
        as the field's failed connects do."""
        with self._lock:
            if self._stop.is_set() or task.status in TERMINAL:
                return
            task.lost = True
            self._record(why, task)
            if not task.primary or task.shell is None or task.shell.poll() is not None:
                self._kill(task)
                return
            frozen = procs.freeze(task.shell.pid, {TAG_ENV: self.tag, NODE_ENV: task.name})
            self._record("frozen", task, processes=len(frozen))
            self._recover(task, self.clock(), self.recovery_delay_s, "cluster lost")

    def _control(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                now = self.clock()
                for task in self.tasks.values():
                    self._step(task, now)
                if self._ended_at is None and self.done():
                    self._ended_at = now
                if self._ended_at is not None and now - self._ended_at >= \
                        self.termination_delay_s:
                    for task in self.tasks.values():
                        if not task.primary and task.status not in TERMINAL:
                            self._record("cancelled", task)
                            task.status = "CANCELLED"
                            self._kill(task, signal.SIGTERM)

    def _step(self, task: GroupTask, now: float) -> None:
        if task.status in (*TERMINAL, "CANCELLED"):
            return
        if task.relaunch_at is not None:
            if now >= task.relaunch_at:
                task.relaunch_at = None
                self._launch(task, new_cluster=task.lost)
            return
        if task.shell is None or task.shell.poll() is None:
            return
        code = _exit_code(task.shell.returncode)
        task.exit_codes.append(code)
        if task.lost:
            self._recover(task, now, self.recovery_delay_s, "cluster lost")
        elif code == 0:
            task.status = "SUCCEEDED"
            self._record("succeeded", task)
        elif code in task.recover_codes:
            self._recover(task, now, self.restart_delay_s, f"exit {code} (recoverable)")
        elif task.restarts_on_errors < task.max_restarts_on_errors:
            task.restarts_on_errors += 1
            self._recover(task, now, self.restart_delay_s, f"exit {code} (restart "
                          f"{task.restarts_on_errors}/{task.max_restarts_on_errors})")
        else:
            task.status = "FAILED"
            self._record("failed", task, code=code)

    def _recover(self, task: GroupTask, now: float, delay_s: float, why: str) -> None:
        task.status = "RECOVERING"
        task.relaunch_at = now + delay_s
        self._record("recovering", task, why=why, delay_s=delay_s)

    def _launch(self, task: GroupTask, new_cluster: bool) -> None:
        if new_cluster:
            self._kill(task)  # the lost cluster's frozen processes: that VM is long gone
            task.cluster += 1
            task.lost = False
        home = self._home(task)
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ, **self.extra_env, **task.envs,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(home),
            "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NODE_IPS": "127.0.0.1\n",
            "SKYPILOT_NUM_NODES": "1",
            "SKYPILOT_NUM_GPUS_PER_NODE": "0",
            "SKYPILOT_TASK_ID": task.task_id,
            "SKYPILOT_TASK_IDS": "\n".join(t.task_id for t in self.tasks.values()),
            "SKYPILOT_MANAGED_JOB_ID": self.job_id,
            "SKYPILOT_ROOT_JOB_ID": self.job_id,
            "SKYPILOT_JOBGROUP_NAME": self.name,
            "SKYPILOT_JOB_RANK": "0",
            "SKYPILOT_CLUSTER_INFO": json.dumps({"cloud": "local", "region": "loopback",
                                                 "zone": None, "num_nodes": 1}),
            "OMP_NUM_THREADS": "1",
            TAG_ENV: self.tag, NODE_ENV: task.name,
        }
        env.pop("ELASTIC_TRAIN_NOTICE_FILE", None)
        with open(self.workdir / f"{task.name}.log", "ab") as log:
            log.write(f"=== cluster {task.cluster} of {task.name}\n".encode())
            log.flush()
            task.shell = subprocess.Popen(
                ["bash", "-c", task.run], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        task.status = "RUNNING"
        self._record("launched", task, cluster=task.cluster)

    def _kill(self, task: GroupTask, sig: int = signal.SIGKILL) -> None:
        shell = task.shell
        if shell is None:
            return
        if sig != signal.SIGKILL and shell.poll() is None:
            shell.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.wait(timeout=10)
        procs.kill_tree(shell, {TAG_ENV: self.tag, NODE_ENV: task.name})

    def _home(self, task: GroupTask) -> Path:
        return self.workdir / task.name / f"cluster{task.cluster}" / "home"

    def _record(self, event: str, task: GroupTask, **detail: Any) -> None:
        self.events.append({"t": self.clock(), "wall": time.time(), "event": event,
                            "task": task.name, **detail})


def _exit_code(returncode: int) -> int:
    """As a shell reports it: 128 + N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def _seconds(value: object) -> float:
    """SkyPilot's duration `30`, `30s`, `5m`, `1h`, `1d`, `1w` in seconds."""
    m = re.fullmatch(r"(\d+)([smhdw]?)", str(value).strip())
    if not m:
        raise ValueError(f"duration {value!r}: expected NUMBER[s|m|h|d|w]")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400,
                              "w": 604800}[m.group(2)]


def _tail(path: Path, limit: int) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


# ------------------------------------------------------------------------------ scenarios

FAULT_KINDS = ("preempt_task", "kill_task", "lose_coordinator")
"""preempt_task: a worker task's node is reclaimed (`notice_s`: with a notice first);
kill_task: every process of a worker task dies, its node stays; lose_coordinator: the
coordinator's node is reclaimed, and SkyPilot re-launches it on a new one (a new address)."""
COORD_TASK = "coord"


@dataclass(frozen=True)
class GroupFault:
    kind: str
    at_step: int
    task: str = COORD_TASK
    notice_s: float | None = None


@dataclass(frozen=True)
class GroupScenario:
    """A chaos scenario in group mode (`chaos/scenarios/group/*.yaml`): `nodes` single-node
    worker tasks and a coordinator. The keys it shares with a cluster scenario mean the same;
    it also validates against the shared scenario contract."""

    name: str
    nodes: int
    """Worker tasks w0..w{nodes-1}, one node each (the coordinator comes on top)."""
    train: dict[str, Any]
    faults: tuple[GroupFault, ...] = ()
    seed: int = 0
    min_nodes: int = 1
    storage: str = "s3"
    recovery_delay_s: float = 5.0
    restart_delay_s: float = 2.0

    @property
    def steps(self) -> int:
        return int(self.train.get("steps", 200))

    def reference_scenario(self) -> Scenario:
        """The harness's scenario of the same trainer and world: its reference run is ours."""
        return Scenario(name=self.name, nodes=self.nodes, train=dict(self.train),
                        seed=self.seed, min_nodes=self.min_nodes, max_nodes=self.nodes,
                        procs_per_node=1, storage=self.storage)  # type: ignore[arg-type]


SCENARIO_KEYS = [f.name for f in dataclasses.fields(GroupScenario)]
FAULT_KEYS = [f.name for f in dataclasses.fields(GroupFault)]


def scenario_from_dict(data: Any, source: str = "scenario") -> GroupScenario:
    """Validate a group scenario document; raises ScenarioError with one line naming the bad
    key or value and what was expected."""
    def fail(msg: str) -> None:
        raise ScenarioError(f"{source}: {msg}")

    if not isinstance(data, dict):
        fail("expected a mapping at the top level")
    for key in data:
        if key not in SCENARIO_KEYS:
            fail(f"unknown key {key!r}; expected some of {', '.join(SCENARIO_KEYS)}")
    for key in ("name", "nodes", "train"):
        if key not in data:
            fail(f"missing {key!r}")
    if not isinstance(data["nodes"], int) or data["nodes"] < 1:
        fail(f"nodes={data['nodes']!r}: expected an integer >= 1 (worker tasks)")
    if not isinstance(data["train"], dict):
        fail("train: expected a mapping of trainer overrides")
    if data.get("storage", "s3") not in ("s3", "file"):
        fail(f"storage={data['storage']!r}: expected s3 or file")
    faults = []
    for i, f in enumerate(data.get("faults") or []):
        where = f"faults.{i}"
        if not isinstance(f, dict) or f.get("kind") not in FAULT_KINDS:
            fail(f"{where}: kind {f.get('kind') if isinstance(f, dict) else f!r}: expected one "
                 f"of {', '.join(FAULT_KINDS)}")
        for key in f:
            if key not in FAULT_KEYS:
                fail(f"{where}: unknown key {key!r}; expected some of {', '.join(FAULT_KEYS)}")
        if not isinstance(f.get("at_step"), int) or f["at_step"] < 0:
            fail(f"{where}: at_step={f.get('at_step')!r}: expected an integer >= 0")
        task = f.get("task", COORD_TASK if f["kind"] == "lose_coordinator" else None)
        workers = [f"w{j}" for j in range(data["nodes"])]
        if f["kind"] != "lose_coordinator" and task not in workers:
            fail(f"{where}: task={task!r}: expected one of {', '.join(workers)}")
        faults.append(GroupFault(kind=f["kind"], at_step=f["at_step"], task=task,
                                 notice_s=f.get("notice_s")))
    known = {k: data[k] for k in SCENARIO_KEYS if k in data and k != "faults"}
    scenario = GroupScenario(**known, faults=tuple(faults))
    if not 1 <= scenario.min_nodes <= scenario.nodes:
        fail(f"min_nodes={scenario.min_nodes}: expected 1..nodes={scenario.nodes}")
    if any(f.at_step >= scenario.steps for f in faults):
        fail(f"a fault's at_step is not before the last step {scenario.steps}")
    return scenario


def load_scenario(path: str | Path) -> GroupScenario:
    """Read a group scenario YAML; raises ScenarioError (one line) when it is bad."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: cannot read it as YAML: {type(e).__name__}") from None
    return scenario_from_dict(data, str(path))


def render_group_yaml(workers: int, min_nodes: int, out: Path) -> Path:
    """`elastic-train sky render --mode group` for a local run (the YAML SkyPilot would get)."""
    from elastic_train.node import sky_render

    args = argparse.Namespace(
        nodes=workers, min_nodes=min_nodes, bucket=None, infra=["aws/us-east-1"],
        accelerators="A100:8", on_demand=False, max_restarts_on_errors=None, name=None,
        run_name=None, data_uri=None, config=None, train_args=None)
    out.write_text(sky_render.to_group_yaml(sky_render.render_group(args, require_bucket=False)))
    return out


@dataclass
class GroupRun:
    """What `run_scenario` saw: the report plus the raw material for figures."""

    report: dict[str, Any]
    records: list[Record]
    events: list[dict[str, Any]]


def clean_out(out: Path) -> None:
    """Remove what an earlier group run left in `out` (its trainer's metrics above all, which
    this run's would otherwise be appended to and checked with)."""
    harness.clean_out(out, dirs=("run", "tasks", "cache"), files=("report.json", "group.yaml"))


def run_scenario(scenario: GroupScenario, out: Path, cache: Path | None = None,
                 timeout_s: float = 600.0, log: Callable[[str], None] = print) -> GroupRun:
    """Run `scenario` in group mode: reference, storage, the rendered group YAML under `SkyGroup`,
    faults as the run reports steps, then the five invariants. Writes `{out}/report.json`."""
    out = out.resolve()
    clean_out(out)
    cache = cache or harness.default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    ref_scenario = scenario.reference_scenario()
    ref = harness.reference(ref_scenario, cache, log)
    run_dir = out / "run"
    group_yaml = render_group_yaml(scenario.nodes, scenario.min_nodes, out / "group.yaml")
    with open_backend(scenario.storage, out, cache) as backend:
        bucket = backend.checkpoint_uri.rsplit("/", 1)[0]
        overrides = {**harness.train_overrides(ref_scenario), "run.dir": str(run_dir),
                     "checkpoint.cache_dir": str(out / "cache")}
        envs = {"BUCKET": bucket, "RUN_NAME": scenario.name, "DATA_URI": backend.data_uri,
                "MIN_NODES": str(scenario.min_nodes),
                "TRAIN_ARGS": shlex.join(f"--{k}={v}" for k, v in overrides.items()),
                # Every coordinator picks a free port: a recovered one has a new address.
                "RDZV_PORT": "0"}
        uri = f"{bucket}/runs/{scenario.name}"
        tail = MetricsTail(run_dir / "metrics.jsonl")
        fired: list[dict[str, Any]] = []
        pending = sorted(scenario.faults, key=lambda f: f.at_step)
        t0 = time.monotonic()
        with SkyGroup(group_yaml, envs, backend.env, out / "tasks",
                      recovery_delay_s=scenario.recovery_delay_s,
                      restart_delay_s=scenario.restart_delay_s) as group:
            while not group.done() and time.monotonic() - t0 < timeout_s:
                tail.poll()
                step = max((int(r["step"]) for r in step_records(tail.records)), default=-1)
                while pending and step >= pending[0].at_step:
                    fault = pending.pop(0)
                    _fire(group, fault)
                    fired.append({**dataclasses.asdict(fault), "fired_at_step": step,
                                  "t": time.monotonic()})
                    log(f"step {step}: {fault.kind} {fault.task}")
                time.sleep(0.1)
            finished = group.done()
            # Before close() kills what is left: a process that outlived its task is an orphan
            # (a run that timed out has its own failure, `completed`).
            survivors = [_describe(p) for p in group.outlived()] if finished else []
            codes = {n: t.exit_codes for n, t in group.tasks.items()}
            statuses = group.statuses()
            logs = group.logs()
        tail.poll()
        records = tail.records
        try:
            committed, verify = harness._verifier(
                dataclasses.replace(backend, checkpoint_uri=uri), scenario)
        except Exception as e:  # noqa: BLE001 - the invariant fails; the report is still written
            committed, verify = [], (lambda step, e=e: (False, str(e)))
    survivors += [str(pid) for pid in backend.pids if psutil.pid_exists(pid)]
    checks = check_invariants(records, scenario.steps, run_dir / "final_model.pt", ref,
                              committed, verify, survivors)
    rep = {
        "scenario": dataclasses.asdict(scenario), "mode": "skygroup", "finished": finished,
        "statuses": statuses, "exit_codes": codes, "run_uri": uri,
        "invariants": {k: v.as_dict() for k, v in checks.items()},
        "faults_fired": fired, "faults_not_fired": [dataclasses.asdict(f) for f in pending],
        "events": group.events, "logs_dir": str(out / "tasks"),
    }
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    if not all(v.ok for v in checks.values()) or not finished:
        log(logs)
    return GroupRun(rep, records, group.events)


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline()[:4])}"
    except psutil.Error:
        return str(process.pid)


def _fire(group: SkyGroup, fault: GroupFault) -> None:
    if fault.kind == "kill_task":
        group.kill(fault.task)
    else:  # preempt_task, lose_coordinator: the node is reclaimed
        group.preempt(fault.task, fault.notice_s)


def check_invariants(records: list[Record], steps: int, final_model: Path,
                     ref: harness.Reference, committed: list[int],
                     verify: Callable[[int], tuple[bool, str]],
                     survivors: list[str]) -> dict[str, invariants.Verdict]:
    """The harness's invariants on what the run produced, and no process left behind."""
    return {**harness.outcome_checks(records, steps, final_model, ref, committed, verify),
            "no_orphans": invariants.no_orphans(survivors)}


def main(argv: list[str] | None = None) -> int:
    """`python -m chaos.skygroup SCENARIO --out DIR`: exit 0 when every invariant held."""
    parser = argparse.ArgumentParser(prog="python -m chaos.skygroup",
                                     description="run a group-mode chaos scenario")
    parser.add_argument("scenario")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as e:
        print(f"chaos skygroup: error: {e}", file=sys.stderr)
        return 2
    run = run_scenario(scenario, args.out, timeout_s=args.timeout)
    failed = {k: v["detail"] for k, v in run.report["invariants"].items() if not v["ok"]}
    print(json.dumps({"finished": run.report["finished"], "failed": failed}))
    return 0 if run.report["finished"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
