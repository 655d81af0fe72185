"""One node of a SkyPilot cluster: `python -m elastic_train.node.launch`, `sky/train.yaml`'s `run:`.

Every node runs this once. It reads what SkyPilot sets on each node and the task's `envs`, and
runs torchrun's elastic agent in a child process (`supervise`: started again if a hung worker's
timer takes the agent down with it):

    torchrun --nnodes=MIN_NODES:SKYPILOT_NUM_NODES --nproc-per-node=SKYPILOT_NUM_GPUS_PER_NODE
             --rdzv-backend=c10d-fast --rdzv-endpoint=HEAD:RDZV_PORT --rdzv-id=SKYPILOT_TASK_ID
             --rdzv-conf=is_host=false,... -m elastic_train.node.worker [--config CONFIG]
             --checkpoint.uri=BUCKET/runs/RUN_NAME [--data.uri=DATA_URI] TRAIN_ARGS...

- `c10d-fast` is torch's c10d rendezvous polling every 0.1 s with fractional timeouts
  (`elastic_train.node.rendezvous`). The agent first forks the node's prefork server
  (`elastic_train.node.prefork`), so that workers start warm after every re-form: each rank,
  `elastic_train.node.worker`, hands the trainer's arguments to that server.
  `elastic_train.node.agent` builds the agent's command line and environment.

- The head (node rank 0) also hosts the rendezvous store: a standalone `TCPStore` in this process,
  so no agent owns it and any agent may die without taking the rendezvous with it. Losing the
  head node loses the store; SkyPilot relaunches a multi-node managed job as a whole then anyway.
- The run lives at `$BUCKET/runs/$RUN_NAME`; RUN_NAME defaults to `SKYPILOT_TASK_ID`, which is
  stable across SkyPilot's recoveries (it also names the rendezvous), so a relaunched cluster
  resumes from the newest committed checkpoint. Another job with the same BUCKET (or a copy of
  the run in another bucket) and RUN_NAME continues the same run anywhere.
- Group mode (a worker task of a SkyPilot job group, `sky/train-group.yaml`; selected by
  GROUP_NODES, the group's worker count): every task is one node, and the store lives on the
  group's `coord` task (`elastic_train.node.coordinator`). This node reads the coordinator's
  record under the run's URI before each agent start and again whenever an agent ended while
  its store was gone (`Coordinator`), so a coordinator re-provisioned on another node is found
  again. The rendezvous id and default run name are `SKYPILOT_JOBGROUP_NAME-SKYPILOT_MANAGED_JOB_ID`
  (shared by every task, stable across recoveries); `--nnodes=MIN_NODES:GROUP_NODES`.
- Exits with the trainer's own exit code (`elastic_train.exit_codes`: 75, 76, 77) when a worker
  failed with one, so that SkyPilot's `recover_on_exit_codes` can see it (torchrun itself exits 1).

Environment besides SkyPilot's: BUCKET, RUN_NAME, DATA_URI, CONFIG, TRAIN_ARGS, MIN_NODES (the
`envs` of `sky/train.yaml`), RDZV_PORT (default 29400), MAX_RESTARTS (default 100: worker failures
each node's agent absorbs before it gives up; membership changes do not count), AGENT_RESTARTS
(default 3, see `supervise`), ELASTIC_TRAIN_NOTICE_FILE (default
`~/.elastic-train/preemption-notice`, the file the YAML's preemption hook writes); group mode:
GROUP_NODES, COORD_WAIT_S (default 600).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from elastic_train import config as config_lib
from elastic_train import exit_codes
from elastic_train.node import prefork, procs
from elastic_train.node.agent import DEFAULT_MAX_RESTARTS, TRAINER_ENTRY, AgentCommand
from elastic_train.node.contract import (
    AGENT_TAG_ENV,
    NOTICE_FILE_ENV,
    PREFORK_SOCKET_ENV,
    TIMER_FILE_ENV,
)
from elastic_train.node.rendezvous import RendezvousSettings, host_store
from elastic_train.startup import gc_paused

if TYPE_CHECKING:  # coordinator.py imports this module; at run time it is imported on first use
    from elastic_train.node.coordinator import Record, Records

DEFAULT_RDZV_PORT = 29400
DEFAULT_AGENT_RESTARTS = 3
"""Times a node starts its agent again after the agent died by a signal (see `supervise`)."""
NOTICE_FILE = "~/.elastic-train/preemption-notice"
"""Written by `sky/train.yaml`'s preemption hook; the trainer polls ELASTIC_TRAIN_NOTICE_FILE."""

# The harness's settings are for loopback; real networks get more room: heartbeats 0.5 s x 4 and
# a 1 s last call. join_timeout stays torch's 600 s: real nodes finish their setup minutes apart.
# The first round waits up to 30 s for every node SkyPilot started (it completes as soon as all
# have joined), so that the job does not start on the nodes that were a second faster.
RDZV = RendezvousSettings(last_call_timeout=1, first_call_timeout=30, keep_alive_interval=0.25,
                          keep_alive_max_attempt=6, join_timeout=None)

TASK_ENVS = ("BUCKET", "RUN_NAME", "DATA_URI", "CONFIG", "TRAIN_ARGS", "MIN_NODES")
"""The task `envs` this module reads; `sky/train.yaml` declares each."""
GROUP_NODES_ENV = "GROUP_NODES"
"""Set only in a job group's worker tasks (`elastic-train sky render --mode group`): how many
worker tasks the group has, the largest world. Its presence selects group mode."""
COORD_WAIT_S = 600.0
"""Longest a worker task waits for a reachable coordinator (env COORD_WAIT_S) before it exits
COLLECTIVE_TIMEOUT, which SkyPilot recovers from: the coordinator's node may be re-provisioned."""
COORD_POLL_S = 1.0
"""Seconds between reads of the coordinator record while none is reachable."""
NODE_FILES_PREFIX = "elastic-train-"
"""A launcher's files in the temp dir are this, its pid, and `.timer`, `.sock` or `.sock.pids`."""
NODE_FILE_RE = re.compile(re.escape(NODE_FILES_PREFIX) + r"(\d+)\.(?:timer|sock|sock\.pids)")


class LaunchError(ValueError):
    """The node's environment cannot start a run; the message is one line for the user."""


@dataclass(frozen=True)
class Node:
    """This node as SkyPilot describes it."""

    ips: tuple[str, ...]
    """Every node's IP in rank order (SKYPILOT_NODE_IPS, newline-separated)."""
    rank: int
    num_nodes: int
    procs: int
    """Workers on this node: one per GPU, one on a CPU-only node."""
    task_id: str

    @property
    def head(self) -> str:
        return self.ips[0]

    @property
    def ip(self) -> str:
        return self.ips[self.rank]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Node:
        """Raises LaunchError naming the first missing or inconsistent SKYPILOT_* variable."""
        missing = [k for k in ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES",
                               "SKYPILOT_TASK_ID") if not env.get(k, "").strip()]
        if missing:
            raise LaunchError(f"{missing[0]} is not set: run this inside a SkyPilot task")
        ips = tuple(line.strip() for line in env["SKYPILOT_NODE_IPS"].splitlines() if line.strip())
        rank = int_env(env, "SKYPILOT_NODE_RANK")
        num_nodes = int_env(env, "SKYPILOT_NUM_NODES")
        gpus = int_env(env, "SKYPILOT_NUM_GPUS_PER_NODE", default=0)
        if len(ips) != num_nodes:
            raise LaunchError(f"SKYPILOT_NODE_IPS lists {len(ips)} nodes, "
                              f"SKYPILOT_NUM_NODES says {num_nodes}")
        if not 0 <= rank < num_nodes:
            raise LaunchError(f"SKYPILOT_NODE_RANK={rank} is not in [0, {num_nodes})")
        return cls(ips=ips, rank=rank, num_nodes=num_nodes, procs=max(gpus, 1),
                   task_id=env["SKYPILOT_TASK_ID"].strip())


def int_env(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    """The integer in `env[key]` (`default` when unset); raises LaunchError naming a bad value."""
    raw = env.get(key, "").strip()
    if not raw and default is not None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{key}={raw!r} is not an integer") from None


def run_uri(env: Mapping[str, str], task_id: str) -> str:
    """`$BUCKET/runs/$RUN_NAME`, RUN_NAME defaulting to the task id."""
    bucket = env.get("BUCKET", "").strip().rstrip("/")
    if not bucket:
        raise LaunchError("set BUCKET (s3://bucket/prefix, gs://... or file:// for one machine): "
                          "checkpoints must outlive the cluster")
    name = env.get("RUN_NAME", "").strip().strip("/") or task_id
    return f"{bucket}/runs/{name}"


def agent_command(node: Node, env: Mapping[str, str], endpoint: str | None = None,
                  run_id: str | None = None, max_nodes: int | None = None) -> AgentCommand:
    """The torchrun agent this node runs, from the task's `envs` in `env`; its files are named
    after this process. Whole-cluster defaults: the store on the head node at RDZV_PORT, the
    task id as rendezvous id and run name, the cluster's node count as the largest world (a job
    group passes its coordinator's address, its own id and its worker count). Raises LaunchError
    naming the first bad variable."""
    max_nodes = node.num_nodes if max_nodes is None else max_nodes
    run_id = run_id or node.task_id
    min_nodes = int_env(env, "MIN_NODES", default=1)
    if not 1 <= min_nodes <= max_nodes:
        raise LaunchError(f"MIN_NODES={min_nodes} is not in [1, {max_nodes}]")
    if endpoint is None:
        endpoint = f"{node.head}:{int_env(env, 'RDZV_PORT', default=DEFAULT_RDZV_PORT)}"
    trainer = ["--checkpoint.uri=" + run_uri(env, run_id)]
    if env.get("CONFIG", "").strip():
        trainer = ["--config", env["CONFIG"].strip(), *trainer]
    if env.get("DATA_URI", "").strip():
        trainer.append("--data.uri=" + env["DATA_URI"].strip())
    trainer += shlex.split(env.get("TRAIN_ARGS", ""))
    check_trainer_config(trainer, node.num_nodes)
    files = os.path.join(tempfile.gettempdir(), f"{NODE_FILES_PREFIX}{os.getpid()}")
    return AgentCommand(
        entry=[*TRAINER_ENTRY, *trainer],
        min_nodes=min_nodes, max_nodes=max_nodes, procs_per_node=node.procs,
        rdzv=RDZV, rdzv_endpoint=endpoint, run_id=run_id,
        local_addr=node.ip,
        max_restarts=int_env(env, "MAX_RESTARTS", default=DEFAULT_MAX_RESTARTS),
        timer_file=f"{files}.timer",
        notice_file=os.path.expanduser(env.get(NOTICE_FILE_ENV) or NOTICE_FILE),
        # In the temp dir: a unix socket's path has at most 108 bytes.
        prefork_socket=f"{files}.sock",
    )


def remove_stale_node_files(directory: str | None = None) -> list[str]:
    """Remove the timer FIFOs, prefork sockets and pid files that earlier launchers on this
    machine left in `directory` (the temp dir) when they were killed before their own cleanup:
    only this user's, and only those of a launcher pid that no longer runs. Returns the names
    removed; never raises for a file that another launcher removed first. Pids tell a live
    launcher only within one PID namespace: containers that share a temp dir need a TMPDIR of
    their own each."""
    directory = directory or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(directory):
        match = NODE_FILE_RE.fullmatch(entry.name)
        if match is None or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            continue
        if psutil.pid_exists(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(entry.name)
    return removed


def trainer_config(trainer: list[str]) -> config_lib.Config:
    """The config that the trainer's arguments (`[--config FILE] --key=value...`) give. Raises
    ConfigError with a one-line message."""
    path, overrides = (trainer[1], trainer[2:]) if trainer[:1] == ["--config"] else (None, trainer)
    return config_lib.load(path, config_lib.parse_overrides(overrides))


def check_trainer_config(trainer: list[str], num_nodes: int) -> None:
    """Validate the trainer's config (`[--config FILE] --key=value...`) once, here, before torchrun
    starts: a bad value would otherwise fail every worker and be restarted MAX_RESTARTS times.
    Raises LaunchError with the config's one-line message."""
    try:
        config = trainer_config(trainer)
    except config_lib.ConfigError as e:
        raise LaunchError(str(e)) from None
    uri = config.checkpoint.uri
    if num_nodes > 1 and not uri.startswith(("s3://", "gs://", "gcs://")) \
            and not config.checkpoint.shared_filesystem:
        raise LaunchError(f"checkpoint.uri={uri!r} is a local path on {num_nodes} nodes: use "
                          "s3:// or gs://, or set checkpoint.shared_filesystem=true if every "
                          "node mounts the same directory")


def run_finished(torchrun_args: list[str]) -> bool:
    """Whether the run the agent's trainer arguments name has written its final weights (under
    its checkpoint URI). False when that cannot be told (no trainer entry, storage unreachable)."""
    from elastic_train.node.contract import FINAL_WEIGHTS
    from elastic_train.node.worker import TRAINER_ENTRY, WORKER_ENTRY

    for entry in (TRAINER_ENTRY, WORKER_ENTRY):
        n = len(entry)
        starts = [i for i in range(len(torchrun_args) - n + 1)
                  if tuple(torchrun_args[i:i + n]) == entry]
        if starts:
            trainer = torchrun_args[starts[0] + n:]
            break
    else:
        return False
    try:
        from checkpointing.storage import Storage

        config = trainer_config(trainer)
        return Storage(config_lib.checkpoint_uri(config), retry_timeout_s=10).exists(FINAL_WEIGHTS)
    except Exception as e:  # noqa: BLE001 - cannot tell: say so, and report the job as ended
        print(f"elastic-train agent: could not check for the run's final weights: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return False


def exit_code_of(failures: Mapping[int, int]) -> int:
    """The node's exit code from its workers' (rank -> exit code): a trainer code if any had one."""
    codes = set(failures.values())
    for code in (exit_codes.PREEMPTED, exit_codes.COLLECTIVE_TIMEOUT,
                 exit_codes.CHECKPOINT_FAILED, exit_codes.BAD_CONFIG):
        if code in codes:
            return code
    return 1


def run_node(env: Mapping[str, str] | None = None) -> int:
    """Start this node's part of the job and return its exit code (the `run:` of the YAML)."""
    env = dict(os.environ if env is None else env)
    if env.get(GROUP_NODES_ENV, "").strip():
        return run_group_node(env)
    try:
        node = Node.from_env(env)
        agent = agent_command(node, env)
        restarts = int_env(env, "AGENT_RESTARTS", default=DEFAULT_AGENT_RESTARTS)
    except LaunchError as e:
        print(f"elastic-train launch: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG

    agent.clear_notice()  # a notice left by an earlier cluster on this disk is stale
    remove_stale_node_files()
    print(f"elastic-train launch: node {node.rank} of {node.num_nodes}, run "
          f"{run_uri(env, node.task_id)}\n  torchrun {shlex.join(agent.torchrun_args())}",
          flush=True)
    # Held until the agent is done: the store lives exactly as long as this head process.
    store = None
    if node.rank == 0:
        store = host_store(node.head, int_env(env, "RDZV_PORT", default=DEFAULT_RDZV_PORT))
    try:
        return supervise(agent.argv(), agent.env(env), restarts)
    finally:
        agent.remove_files()
        del store


def run_group_node(env: dict[str, str]) -> int:
    """A worker task of a job group (one node): find the coordinator through its record, run the
    agent against its store, and find it again whenever the store is lost (`Coordinator`)."""
    from elastic_train.node.coordinator import GroupTask, Records

    try:
        node = Node.from_env(env)
        if node.num_nodes != 1:
            raise LaunchError(f"SKYPILOT_NUM_NODES={node.num_nodes}: each worker task of a job "
                              "group is one node")
        task = GroupTask.from_env(env)
        nodes = int_env(env, GROUP_NODES_ENV)
        restarts = int_env(env, "AGENT_RESTARTS", default=DEFAULT_AGENT_RESTARTS)
        wait_s = float(int_env(env, "COORD_WAIT_S", default=int(COORD_WAIT_S)))
        agent_command(node, env, "", task.run_id, nodes)  # refuse a bad environment now
    except LaunchError as e:
        print(f"elastic-train launch: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG

    def build(endpoint: str) -> AgentCommand:
        return agent_command(node, env, endpoint, task.run_id, nodes)

    first = build("")
    first.clear_notice()  # a notice left by an earlier cluster on this disk is stale
    remove_stale_node_files()
    print(f"elastic-train launch: worker task {task.task_id} of {nodes}, run {task.run_uri}",
          flush=True)
    coordinator = Coordinator(Records(task.run_uri, task.job_id), build, env, wait_s)
    try:
        return supervise([], env, restarts, coordinator)
    finally:
        first.remove_files()  # every agent of this process had the same files


class Coordinator:
    """How a worker task finds the rendezvous store: the newest coordinator record whose address
    answers (`elastic_train.node.coordinator`), read before each agent start and again after an
    agent ended while its store was lost."""

    def __init__(self, records: Records, build: Callable[[str], AgentCommand],
                 env: Mapping[str, str], wait_s: float = COORD_WAIT_S,
                 poll_s: float = COORD_POLL_S) -> None:
        self.records = records
        self.build = build
        self.env = env
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.current: Record | None = None
        """The record the running agent uses."""

    def find(self) -> Record:
        """The newest record whose store answers. Raises LaunchError after `wait_s` without."""
        from checkpointing.errors import StorageError
        from elastic_train.node.coordinator import reachable

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                record = self.records.newest()
            except StorageError:
                record = None  # the bucket is briefly unreachable: as if no record yet
            if record is not None and reachable(record.address):
                return record
            if time.monotonic() >= deadline:
                raise LaunchError(f"no reachable coordinator for {self.wait_s:g} s "
                                  f"(newest record: {record})")
            time.sleep(self.poll_s)

    def agent(self) -> tuple[list[str], dict[str, str]]:
        """The next agent's command line and environment, against the coordinator found now."""
        record = self.current = self.find()
        print(f"elastic-train launch: coordinator epoch {record.epoch} at {record.address}",
              flush=True)
        agent = self.build(record.address)
        return agent.argv(), agent.env(self.env)

    def store_lost(self) -> bool:
        """Whether the running agent's store is gone: unreachable, or replaced by a newer one."""
        from checkpointing.errors import StorageError
        from elastic_train.node.coordinator import reachable

        if self.current is None or not reachable(self.current.address):
            return True
        try:
            return self.records.superseded(self.current)
        except StorageError:
            return False  # the store answers; the bucket will be asked again next time


def supervise(cmd: list[str], env: Mapping[str, str], restarts: int,
              coordinator: Coordinator | None = None) -> int:
    """Run the agent `cmd` until it ends by itself; return its exit code.

    An agent that dies by a signal (the OOM killer, or torch's own timer server, which kills its
    agent after reaping a hung worker) would take this node out of the job for good, and on the
    head the rendezvous store with it. The agent therefore runs in a child process: when it dies
    by a signal this process starts a fresh one (up to `restarts` times), which rejoins like a
    node coming back. Then it gives up
    with COLLECTIVE_TIMEOUT, which SkyPilot recovers from. SIGTERM and SIGINT to this process are
    passed on to the agent (its workers get them from it).

    With a `coordinator` (a job group's worker task), `cmd` and `env` are ignored: each agent's
    are built after finding the coordinator, and an agent that failed while its store was lost
    is started again against the coordinator found next, without counting against `restarts`.
    Gives up with COLLECTIVE_TIMEOUT when no coordinator answers for its `wait_s`."""
    attempt = 0
    starts = 0
    while True:
        tag = f"{os.getpid()}-{attempt}-{starts}"
        starts += 1
        if coordinator is not None:
            try:
                cmd, env = coordinator.agent()
            except LaunchError as e:
                print(f"elastic-train launch: {e}; giving up", file=sys.stderr, flush=True)
                return exit_codes.COLLECTIVE_TIMEOUT
        agent = subprocess.Popen(cmd, env={**env, AGENT_TAG_ENV: tag})
        forward = {sig: signal.signal(sig, lambda s, _f, a=agent: a.send_signal(s))
                   for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = agent.wait()
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)
            # Workers live in sessions of their own and outlive a killed agent; they must not
            # hold the node's devices while the next agent starts its own.
            procs.kill(procs.tagged({AGENT_TAG_ENV: tag}))
        if (coordinator is not None and code not in (0, exit_codes.PREEMPTED, -signal.SIGTERM,
                                                     -signal.SIGINT)
                and coordinator.store_lost()):
            print(f"elastic-train launch: the agent ended ({code}) and the rendezvous store at "
                  f"{coordinator.current and coordinator.current.address} is gone; finding the "
                  "coordinator again",
                  file=sys.stderr, flush=True)
            continue
        if code >= 0 or code in (-signal.SIGTERM, -signal.SIGINT):
            return code if code >= 0 else 128 - code
        if attempt >= restarts:
            print(f"elastic-train launch: the agent died by signal {-code} {attempt + 1} times; "
                  "giving up", file=sys.stderr, flush=True)
            return exit_codes.COLLECTIVE_TIMEOUT
        attempt += 1
        print(f"elastic-train launch: the agent died by signal {-code} (a hung worker's timer?); "
              f"starting it again ({attempt}/{restarts})", file=sys.stderr, flush=True)


def bounded_agent_class() -> type[Any]:
    """torch 2.13's LocalElasticAgent, re-forming without its hard-coded 30 s wait.

    Re-forming (a node lost or added, a worker failed), it stops its workers with SIGKILL rather
    than SIGTERM and that grace: a worker blocked in a collective with a vanished peer runs no
    signal handler until the collective times out, and a stopped worker's state is dropped
    anyway (every worker resumes from the newest commit). Stopping the node (the agent
    SIGTERMed) still gives workers `--shutdown-timeout`.

    Its exit barrier keeps torch's 300 s: the agents whose workers finished wait there for the
    node of global rank 0, which writes the final weights after the last collective (minutes for
    a large model); on the head node the rendezvous store must outlive that.

    Stopped with a preemption notice on its node, it first leaves the rendezvous
    (`leave()` of the c10d-fast handler), so the other nodes re-form at once.

    Rank assignment does not wait on the store either: `AgentCommand.env` sets
    TORCH_ELASTIC_WORKER_IDENTICAL (every node runs the same number of workers). These are
    private methods of torch's agent; tests/test_field_failures.py fails if an upgrade moves
    them."""
    from torch.distributed.elastic.agent.server.api import WorkerGroup
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class BoundedAgent(LocalElasticAgent):
        def _stop_workers(self, worker_group: WorkerGroup) -> None:
            self._shutdown(signal.SIGKILL, timeout=self._shutdown_timeout)

        def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM,
                      timeout: int = 30) -> None:
            # A node with a preemption notice goes for good (its worker saved, then SIGTERMed
            # this agent): leave the rendezvous first, so the others re-form now rather than
            # when its keep-alive lapses.
            leave = getattr(self._rdzv_handler, "leave", None)
            if death_sig == signal.SIGTERM and leave is not None and _noticed():
                leave()
            super()._shutdown(death_sig, timeout)

    return BoundedAgent


def _noticed() -> bool:
    """Whether this node holds a preemption notice (its file exists)."""
    notice = os.environ.get(NOTICE_FILE_ENV, "")
    return bool(notice) and os.path.exists(notice)


def run_agent(args: list[str]) -> int:
    """torchrun's elastic agent, in this process, so that the workers' own exit codes reach us
    (torchrun's command exits 1 for any worker failure). Must run in the main thread.

    Returns COLLECTIVE_TIMEOUT (which SkyPilot recovers on) when the job cannot go on from
    here: fewer than min_nodes nodes joined within the join timeout, or the rendezvous store
    stopped answering."""
    with gc_paused():  # a node that comes back joins sooner (see gc_paused)
        import torch.distributed.launcher.api as launcher
        from torch.distributed import DistError
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.rendezvous import (
            RendezvousClosedError,
            RendezvousError,
        )
        from torch.distributed.run import parse_args, run

        from elastic_train.node.watchdog import start_watchdog

    if os.environ.get(PREFORK_SOCKET_ENV):
        # Now, while this process has no threads: the workers then start as forks of a server
        # that has imported torch and the trainer once, not as fresh interpreters that each
        # import them again. (Not forked before `import torch` so that both import it side by
        # side: that measured slower, as on a busy node the two imports only take turns on the
        # same cores.)
        prefork.fork_server(os.environ[PREFORK_SOCKET_ENV], prefork.preload_for(args))
    # The node's hang watchdog, in a thread of the agent (started after the fork: the prefork
    # server must begin with one thread). Not a process of its own: a node that comes back would
    # import torch twice at once, which on a busy node delays its joining.
    timer_file = os.environ.get(TIMER_FILE_ENV, "")
    watchdog = start_watchdog(timer_file) if timer_file else None
    launcher.LocalElasticAgent = bounded_agent_class()  # what torchrun's `run` constructs
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        return exit_code_of({rank: f.exitcode for rank, f in e.failures.items()})
    except RendezvousClosedError:
        # Another agent ended the job: it finished (a replacement node that comes after the last
        # step has nothing to do, and must not fail its task), or it gave up with its own code.
        if run_finished(args):
            print("elastic-train agent: the run finished before this node joined; nothing to do",
                  file=sys.stderr, flush=True)
            return exit_codes.OK
        print("elastic-train agent: the rendezvous was closed by another node and the run has "
              "no final weights: the job ended without this node", file=sys.stderr, flush=True)
        return exit_codes.JOB_ENDED
    except (RendezvousError, DistError) as e:
        print(f"elastic-train agent: the job cannot go on from this node: "
              f"{type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr,
              flush=True)
        return exit_codes.COLLECTIVE_TIMEOUT
    except SignalException as e:
        # A worker with a preemption notice saves, then SIGTERMs its agent (this process) so the
        # node leaves instead of rejoining; any other signal is SkyPilot stopping the job.
        if _noticed():
            return exit_codes.PREEMPTED
        return 128 + int(e.sigval)
    finally:
        if watchdog is not None:
            watchdog.stop()
    return exit_codes.OK


if __name__ == "__main__":
    if sys.argv[1:2] == ["--agent"]:
        sys.exit(run_agent(sys.argv[2:]))
    sys.exit(run_node())
