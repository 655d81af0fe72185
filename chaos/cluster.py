"""A local elastic "cluster": nodes as torchrun agents around a standalone rendezvous store.

`LocalCluster` is the one object that starts, kills and adds nodes. Use it as a context manager:
on exit (normal, exception or Ctrl-C) every process it started, and every process those started,
is killed and reaped, found both through the process tree and through an environment tag
(`CHAOS_RUN_TAG`) that every agent, worker and helper of the run inherits. A node's death is the
death of its agent *and all of its descendants*: torchrun starts workers in sessions of their own,
so killing an agent's process group would leave its workers training.

Nodes are numbered from 0 in creation order and never renumbered; a removed node's number is not
reused.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType

import psutil

from elastic_train.node import launch, prefork, procs
from elastic_train.node.agent import DEFAULT_SHUTDOWN_TIMEOUT_S, AgentCommand, runs_trainer
from elastic_train.node.rendezvous import ASKING_TO_JOIN, RendezvousSettings, expect_first_round

TAG_ENV = "CHAOS_RUN_TAG"
"""Set on every agent; inherited by its workers and their helpers. Value: the cluster's tag."""
NODE_ENV = "CHAOS_NODE"
"""The node number of an agent and of everything it starts."""


@dataclass
class Node:
    index: int
    agent: subprocess.Popen[bytes]
    notice_file: Path
    log_path: Path
    started: float
    removed: float | None = None
    """time.time() when the harness killed or froze it (None while it lives or after it exited
    itself)."""
    frozen: set[int] = field(default_factory=set)
    """vanish_node: the pids stopped with SIGSTOP; they are killed at `close()`."""
    pids: set[int] = field(default_factory=set)
    """Every descendant pid seen (for the orphan check)."""
    prefork_socket: str = ""
    """The socket of the agent's prefork server (elastic_train/node/prefork.py), whose children run
    the ranks; empty when the entry is not the trainer."""

    @property
    def running(self) -> bool:
        return self.removed is None and self.agent.poll() is None


class ClusterError(RuntimeError):
    """The cluster could not do what was asked (e.g. the store did not start)."""


PHASE_LINES: dict[str, str] = {
    "rendezvous": "Rendezvous'ing worker group",
    "workers": "Starting worker group",
}
"""What torchrun's agent logs (at INFO, torch/distributed/elastic/agent/server/api.py) as it enters
each phase of a (re-)form: `reform_phase` reads node logs for them."""

FIRST_CALL_S: float = launch.RDZV.first_call_timeout or 30.0
"""`first_world`: how long the first round waits for the nodes it expects (the cloud launcher's
first call)."""

FREEZE_CHECK_S = 5.0
"""vanish_node: how long the stopped processes may take to show as stopped (SIGSTOP is
asynchronous) before the freeze counts as failed."""


class LocalCluster:
    """Nodes on this machine forming one elastic torchrun job.

    Args:
        workdir: node logs and notice files go here (created).
        entry: what torchrun runs per worker, e.g. `["-m", "elastic_train.train", "--steps=20"]`.
        min_nodes, max_nodes, procs_per_node: torchrun's `--nnodes=MIN:MAX --nproc-per-node`.
        env: extra environment for every node (storage endpoints, thread counts...).
        rdzv: rendezvous settings (default: the fast ones).
        shutdown_timeout_s: seconds torchrun waits for SIGTERMed workers before SIGKILL.
        max_restarts: worker failures each node's agent absorbs before it gives up.
        prefork: start trainer workers as forks of a per-node prefork server (warm) rather than
            as fresh interpreters; only for the `-m elastic_train.train` entry.
        first_world: nodes the caller adds at once at the start. The job's first round then
            completes when all of them have joined, waiting up to `FIRST_CALL_S` for a slow one
            (as the cloud launcher's first call does), rather than forming with whichever joined
            within the last call and growing right after; None: torch's last call.
    """

    def __init__(
        self,
        workdir: str | Path,
        entry: Sequence[str],
        *,
        min_nodes: int = 1,
        max_nodes: int = 1,
        procs_per_node: int = 1,
        env: dict[str, str] | None = None,
        rdzv: RendezvousSettings | None = None,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        # Restarts are how an elastic job survives the harness's faults; a run ends by finishing,
        # not by running out of them.
        max_restarts: int = 1000,
        prefork: bool = True,
        first_world: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.entry = list(entry)
        if runs_trainer(self.entry):
            # Every node of a local cluster is this machine, so its paths are shared: say so,
            # as a multi-node file:// run must (the trainer checks it with a probe file). Right
            # after the module, so that the caller's own setting still wins.
            self.entry.insert(2, "--checkpoint.shared_filesystem=true")
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.procs_per_node = procs_per_node
        self.extra_env = dict(env or {})
        self.rdzv = rdzv or RendezvousSettings.fast()
        if first_world is not None and self.rdzv.first_call_timeout is None:
            self.rdzv = replace(self.rdzv, first_call_timeout=FIRST_CALL_S)
        self.first_world = first_world
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_restarts = max_restarts
        self.prefork = prefork and runs_trainer(self.entry)
        self.tag = uuid.uuid4().hex[:12]
        self.run_id = f"chaos-{self.tag}"
        self.nodes: list[Node] = []
        self.store_port: int | None = None
        self._store: subprocess.Popen[str] | None = None
        self._timers: list[threading.Timer] = []
        self._lock = threading.RLock()
        self._closed = False
        self.on_node_removed: list[Callable[[int, float], None]] = []
        """Callbacks `f(node_index, t)` run when a scheduled kill (after a notice) happens."""

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start the rendezvous store. Raises ClusterError when it does not come up in 30 s."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TAG_ENV: self.tag, NODE_ENV: "store"}
        self._store = subprocess.Popen(
            [sys.executable, "-m", "chaos.rdzv_store"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(self.workdir / "store.log", "w"),  # noqa: SIM115
            text=True, env=env, start_new_session=True,
        )
        line = _readline_within(self._store, 30.0)
        if not line.startswith("PORT "):
            self.close()
            raise ClusterError(f"rendezvous store did not start (see {self.workdir}/store.log)")
        self.store_port = int(line.split()[1])
        if self.first_world is not None:
            from torch.distributed import TCPStore

            client = TCPStore("127.0.0.1", self.store_port, is_master=False,
                              wait_for_workers=False)
            expect_first_round(client, self.run_id, self.first_world)

    def close(self) -> None:
        """Kill every node and the store; reap them; sweep any process still tagged with this run.

        Safe to call twice and on a half-started cluster. Never raises for a process that is
        already gone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for timer in self._timers:
                timer.cancel()
        for node in self.nodes:
            self._kill_tree(node)
        if self._store is not None:
            self._store.terminate()
            try:
                self._store.wait(5)
            except subprocess.TimeoutExpired:
                self._store.kill()
                self._store.wait()
        procs.kill(self.tagged_processes())

    # ----------------------------------------------------------------------------- nodes

    def add_node(self) -> int:
        """Start one more torchrun agent; returns its node number. It joins at the next
        rendezvous (the running nodes see it waiting and re-form with it)."""
        if self.store_port is None:
            raise ClusterError("start the cluster before adding nodes")
        with self._lock:
            index = len(self.nodes)
            log_path = self.workdir / f"node{index}.log"
            agent = AgentCommand(
                entry=self.entry, min_nodes=self.min_nodes, max_nodes=self.max_nodes,
                procs_per_node=self.procs_per_node, rdzv=self.rdzv,
                rdzv_endpoint=f"127.0.0.1:{self.store_port}", run_id=self.run_id,
                timer_file=str(self.workdir / f"timer-node{index}"),
                notice_file=str(self.workdir / f"notice-node{index}"),
                # Socket paths are short (108 bytes): the temp dir, not workdir.
                prefork_socket=os.path.join(tempfile.gettempdir(), f"et-{self.tag}-{index}.sock")
                if self.prefork else "",
                max_restarts=self.max_restarts,
                shutdown_timeout_s=self.shutdown_timeout_s,
            )
            agent.clear_notice()
            env = agent.env({
                **os.environ,
                **self.extra_env,
                TAG_ENV: self.tag,
                NODE_ENV: str(index),
                # torchrun logs rendezvous rounds and worker exits at INFO: the node logs then
                # show where a recovery spent its time.
                "LOGLEVEL": "INFO",
            })
            log = open(log_path, "ab")  # noqa: SIM115 - the agent owns it; closed below
            try:
                process = subprocess.Popen(agent.argv(), stdout=log, stderr=subprocess.STDOUT,
                                           env=env, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            finally:
                log.close()
            self.nodes.append(Node(index, process, Path(agent.notice_file), log_path, time.time(),
                                   prefork_socket=agent.prefork_socket))
            return index

    def node(self, index: int) -> Node:
        try:
            return self.nodes[index]
        except IndexError:
            raise ClusterError(f"node {index} does not exist") from None

    def live_nodes(self) -> list[int]:
        """Node numbers whose agent runs and that the harness has not removed."""
        return [n.index for n in self.nodes if n.running]

    def kill_node(self, index: int) -> float:
        """SIGKILL the node's agent and every descendant, as a reclaimed machine would vanish.
        Returns the time it happened. A node already gone is a no-op."""
        node = self.node(index)
        with self._lock:
            if node.removed is None:
                node.removed = time.time()
        self._kill_tree(node)
        return node.removed

    # The signal that freezes a vanished node (a test replaces it to prove a failed freeze is seen).
    freeze_signal: signal.Signals = signal.SIGSTOP

    def vanish_node(self, index: int) -> float:
        """Freeze the node whole, as a reclaimed VM vanishes: SIGSTOP its agent first (so it
        starts nothing new), then every process of the node (prefork server, workers, their
        helpers), found through the tree and the node's tag. Its sockets stay open and its
        heartbeats stop: the other nodes get no reset, only silence. The frozen processes are
        killed at `close()`. Returns the time it happened.

        Raises ClusterError, naming them, when some of the node's processes are not seen stopped
        within FREEZE_CHECK_S (a fault counts only if its effect was observed), or when the node
        has no process left to freeze."""
        node = self.node(index)
        with self._lock:
            if node.removed is not None:
                raise ClusterError(f"node {index} was already removed")
            node.removed = time.time()
        tags = {TAG_ENV: self.tag, NODE_ENV: str(node.index)}
        root = node.agent.pid if node.agent.poll() is None else None
        node.frozen |= procs.freeze(root, tags, self.freeze_signal)
        node.pids |= node.frozen
        if not node.frozen:
            raise ClusterError(f"node {index} had no process to freeze")
        running = procs.not_stopped(node.frozen, FREEZE_CHECK_S)
        if running:
            raise ClusterError(f"node {index}: {len(running)} of {len(node.frozen)} process(es) "
                               f"not frozen after {FREEZE_CHECK_S:g} s (pids "
                               f"{', '.join(map(str, sorted(running)[:5]))})")
        return node.removed

    def workers_started_at(self, index: int) -> float | None:
        """time.time() at which node `index`'s agent first started its workers in a formed world
        (the timestamp of that line of its log); None: it never did."""
        return self._first_logged(index, PHASE_LINES["workers"])

    def joining_at(self, index: int) -> float | None:
        """time.time() at which node `index`'s agent first asked to join a world: its process
        had started and imported what it needs (a cloud node's boot ends there too), and, when
        it joins a running world, its prefork server had imported the trainer."""
        return self._first_logged(index, ASKING_TO_JOIN) or \
            self._first_logged(index, PHASE_LINES["rendezvous"])

    def _first_logged(self, index: int, text: str) -> float | None:
        path = self.node(index).log_path
        if not path.exists():
            return None
        with open(path, errors="replace") as f:
            line = next((line for line in f if text in line), None)
        return None if line is None else _log_time(line)

    def log_offsets(self) -> dict[int, int]:
        """The current size of every node's log: `reform_phase` reads what comes after."""
        return {n.index: _size(n.log_path) for n in self.nodes}

    def reform_phase(self, since: dict[int, int]) -> str | None:
        """The furthest phase of a (re-)form (a key of PHASE_LINES, or "restore") that a live
        node's agent reached after the log offsets `since` (nodes added later: from their
        start). "restore" is "workers" once that node's new workers run. None: none yet."""
        best: str | None = None
        for index in self.live_nodes():
            node = self.nodes[index]
            try:
                with open(node.log_path, "rb") as f:
                    f.seek(since.get(index, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            if PHASE_LINES["workers"] in text:
                if self.workers(index):
                    return "restore"
                best = "workers"
            elif PHASE_LINES["rendezvous"] in text and best is None:
                best = "rendezvous"
        return best

    def preempt_node(self, index: int, notice_s: float) -> float:
        """Give the node a preemption notice (its notice file appears) and kill it `notice_s`
        seconds later, whatever it did meanwhile. Returns when the notice was given."""
        node = self.node(index)
        node.notice_file.write_text(json.dumps({"source": "chaos", "notice_s": notice_s,
                                                "deadline": time.time() + notice_s}))
        t = time.time()

        def reclaim() -> None:
            if self._closed:
                return
            when = self.kill_node(index)
            for callback in self.on_node_removed:
                callback(index, when)

        timer = threading.Timer(notice_s, reclaim)
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()
        return t

    def workers(self, index: int) -> list[psutil.Process]:
        """The node's live trainer processes, ordered by LOCAL_RANK: the prefork children that
        run the ranks torchrun started (or torchrun's own processes, when they started cold)."""
        node = self.node(index)
        found: list[tuple[int, psutil.Process]] = []
        try:
            children = psutil.Process(node.agent.pid).children()
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                env = child.environ()
                if "LOCAL_RANK" in env and child.status() != psutil.STATUS_ZOMBIE:
                    trainer = child.pid
                    if node.prefork_socket:  # None while it waits for the server to fork it
                        trainer = prefork.trainer_pid(node.prefork_socket, child.pid)
                    if trainer is not None:
                        found.append((int(env["LOCAL_RANK"]), psutil.Process(trainer)))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return [p for _, p in sorted(found, key=lambda x: x[0])]

    def wait_for_workers(self, index: int, timeout_s: float = 30.0) -> list[psutil.Process]:
        """The node's workers, waiting up to `timeout_s` for them to exist. Raises ClusterError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.workers(index)
            if found:
                return found
            time.sleep(0.05)
        raise ClusterError(f"node {index} has no workers after {timeout_s:.0f} s")

    def kill_worker(self, index: int, local_rank: int = 0) -> int:
        """SIGKILL one worker of the node (a rank's process crashes). Returns its pid."""
        proc = self._worker(index, local_rank)
        procs.signal_quietly(proc.pid, signal.SIGKILL)
        return proc.pid

    def hang_worker(self, index: int, local_rank: int = 0) -> int:
        """SIGSTOP one worker of the node: it neither runs nor dies, the way a wedged rank looks.
        The job must detect it (the trainer's hang timer, the collective timeout). Returns the pid;
        `close()` kills it if nothing else did."""
        proc = self._worker(index, local_rank)
        procs.signal_quietly(proc.pid, signal.SIGSTOP)
        return proc.pid

    def _worker(self, index: int, local_rank: int) -> psutil.Process:
        workers = self.wait_for_workers(index)
        return workers[min(local_rank, len(workers) - 1)]

    # ----------------------------------------------------------------------------- waiting

    def wait(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Wait until no node's agent runs; False on timeout (nothing is killed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.live_nodes():
                return True
            time.sleep(poll_s)
        return not self.live_nodes()

    def exit_codes(self) -> dict[int, int | None]:
        return {n.index: n.agent.poll() for n in self.nodes}

    # ----------------------------------------------------------------------------- processes

    def tagged_processes(self) -> list[psutil.Process]:
        """Every live (non-zombie) process carrying this cluster's tag: agents, workers and any
        helper they started, wherever in the process tree they ended up."""
        return procs.tagged({TAG_ENV: self.tag})

    def _kill_tree(self, node: Node) -> None:
        node.pids |= procs.kill_tree(node.agent, {TAG_ENV: self.tag, NODE_ENV: str(node.index)})
        if node.prefork_socket:
            prefork.remove(node.prefork_socket)


def _log_time(line: str) -> float | None:
    """The time of one of torch's log lines (`I1201 12:57:19.434000 pid file:line] ...`, local
    time, no year: this year's)."""
    match = re.match(r"[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d+) ", line)
    if match is None:
        return None
    year = time.localtime().tm_year
    when = datetime.strptime(f"{year}{match[1]} {match[2]}", "%Y%m%d %H:%M:%S.%f")
    return when.timestamp()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _readline_within(proc: subprocess.Popen[str], timeout_s: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0].strip() if result else ""
