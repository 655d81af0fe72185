"""The local cluster itself, with workers that only sleep (fast): killing a node kills its whole
tree, a hung worker is stopped, and closing leaves nothing behind."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from chaos import invariants
from chaos.cluster import NODE_ENV, TAG_ENV, ClusterError, LocalCluster
from chaos.faults import Injector
from chaos.scenario import Fault
from elastic_train.node import procs
from elastic_train.node.rendezvous import RendezvousSettings

SLEEPER = """
import subprocess, sys, time
# A grandchild in the worker's session: a node's death must take it too.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(600)
"""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.mark.timeout(180)
def test_kill_node_takes_every_descendant_and_close_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    seen: set[int] = set()
    with LocalCluster(tmp_path / "cluster", [str(script)], min_nodes=1, max_nodes=2) as cluster:
        assert cluster.store_port
        added = time.time()
        for _ in range(2):
            cluster.add_node()
        _wait_until(lambda: all(len(_descendants(cluster.node(i).agent.pid)) >= 2
                                for i in (0, 1)))
        # When each agent logged that it started its workers: after the node was added, before
        # its workers were seen (log lines carry milliseconds).
        assert all(added - 0.01 <= (cluster.workers_started_at(i) or 0) <= time.time()
                   for i in (0, 1))
        doomed = _descendants(cluster.node(1).agent.pid)
        first_workers = _descendants(cluster.node(0).agent.pid)
        seen |= {p.pid for p in doomed} | {p.pid for p in first_workers}

        cluster.kill_node(1)
        gone, alive = psutil.wait_procs(doomed, timeout=10)
        assert not alive, f"survived a node kill: {alive}"
        assert cluster.live_nodes() == [0]
        # The survivor re-forms alone: its agent replaces the workers it had. Hanging a worker
        # before that would stop one the restart is about to kill.
        psutil.wait_procs(first_workers, timeout=60)
        _wait_until(lambda: len(_descendants(cluster.node(0).agent.pid)) >= 2)
        seen |= {p.pid for p in _descendants(cluster.node(0).agent.pid)}

        pid = cluster.hang_worker(0)
        _wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10)

        index = cluster.add_node()
        assert index == 2 and cluster.live_nodes() == [0, 2]
    assert cluster.tagged_processes() == []
    for pid in seen:
        assert not psutil.pid_exists(pid) or \
            psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"pid {pid} outlived close()"


def _node_processes(cluster: LocalCluster, index: int) -> list[psutil.Process]:
    return procs.tagged({TAG_ENV: cluster.tag, NODE_ENV: str(index)})


def _tcp_sockets(pid: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED)
    except psutil.NoSuchProcess:
        return 0


@pytest.mark.timeout(180)
def test_vanish_node_freezes_the_whole_node_keeps_its_sockets_and_close_reaps_it(
        tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    with LocalCluster(tmp_path / "cluster", [str(script)], min_nodes=1, max_nodes=2) as cluster:
        for _ in range(2):
            cluster.add_node()
        _wait_until(lambda: all(len(_descendants(cluster.node(i).agent.pid)) >= 2
                                for i in (0, 1)))
        agent = cluster.node(1).agent.pid
        sockets = _tcp_sockets(agent)
        assert sockets >= 1, "the agent talks to the rendezvous store"

        cluster.vanish_node(1)

        frozen = _node_processes(cluster, 1)
        assert {p.pid for p in frozen} >= {agent} | {p.pid for p in _descendants(agent)}
        assert all(p.status() == psutil.STATUS_STOPPED for p in frozen), \
            [(p.pid, p.status()) for p in frozen]
        # No reset reaches the peers: the frozen agent's connections stay open.
        assert _tcp_sockets(agent) == sockets
        assert cluster.live_nodes() == [0]
        assert all(p.status() != psutil.STATUS_STOPPED for p in _node_processes(cluster, 0))
        with pytest.raises(ClusterError, match="already removed"):
            cluster.vanish_node(1)
    assert cluster.tagged_processes() == []
    for p in frozen:
        assert not psutil.pid_exists(p.pid) or p.status() == psutil.STATUS_ZOMBIE


class _NoFreezeCluster(LocalCluster):
    """A cluster whose freeze does nothing (SIGCONT to running processes): a broken fault."""

    freeze_signal = signal.SIGCONT


@pytest.mark.timeout(180)
def test_a_vanish_that_froze_nothing_is_reported_not_counted(tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    lines: list[str] = []
    with _NoFreezeCluster(tmp_path / "cluster", [str(script)], min_nodes=1,
                          max_nodes=2) as cluster:
        for _ in range(2):
            cluster.add_node()
        _wait_until(lambda: len(_descendants(cluster.node(1).agent.pid)) >= 2)
        injector = Injector([Fault("vanish_node", at_step=1, node=1)], cluster,
                            checkpoint_every=5, steps=10, log=lines.append)
        (fired,) = injector.observe([{"step": 1, "loss": 1.0, "world_size": 2, "time": 1.0}])
    assert "not frozen" in fired.detail["error"]
    assert "FAILED" in lines[0]
    verdict = invariants.faults_observed(injector.fired, [])
    assert not verdict.ok and "its action failed" in verdict.detail


def test_rendezvous_settings_say_why_and_default_is_torchs() -> None:
    fast = RendezvousSettings.fast().conf()
    assert fast.startswith("is_host=false,")
    assert "last_call_timeout=0.5" in fast and "keep_alive_max_attempt=3" in fast
    assert RendezvousSettings.fast().backend == "c10d-fast"
    default = RendezvousSettings.torch_default()
    assert default.conf() == "is_host=false" and default.backend == "c10d"


def test_the_store_stops_when_its_owner_goes(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, [sys.executable])
    cluster.start()
    store = cluster._store
    assert store is not None and store.poll() is None
    assert store.stdin is not None
    store.stdin.close()  # what the harness dying looks like to the store
    store.wait(10)
    cluster.close()


@pytest.mark.timeout(240)
def test_trainer_workers_are_warm_forks_and_a_crash_restarts_one(tmp_path: Path) -> None:
    """With the trainer entry, every node's agent forks a prefork server and torchrun's workers
    run as its children (forked, never exec'd: they start without importing anything); a killed
    one is restarted warm too, and closing leaves nothing."""
    from chaos.backends import prepared_data
    from chaos.metrics import MetricsTail

    run_dir = tmp_path / "run"
    entry = ["-m", "elastic_train.train", "--model=tiny", "--steps=100000", "--run.threads=1",
             f"--run.dir={run_dir}", f"--data.uri={prepared_data(tmp_path / 'cache')}",
             "--checkpoint.every=0", "--parallel.hang_timeout_s=5"]
    tail = MetricsTail(run_dir / "metrics.jsonl")

    def starts() -> list[dict]:
        tail.poll()
        return [r for r in tail.records if r.get("event") == "start"]

    with LocalCluster(tmp_path / "cluster", entry, min_nodes=1, max_nodes=1) as cluster:
        cluster.add_node()
        agent = psutil.Process(cluster.node(0).agent.pid)
        _wait_until(lambda: len(starts()) == 1)
        trainer = cluster.wait_for_workers(0)[0]
        server = trainer.parent()
        assert server is not None and server.ppid() == agent.pid  # agent -> server -> trainer
        assert trainer.pid not in {c.pid for c in agent.children()}
        # torchrun starts each rank as the node's worker, with the trainer's arguments.
        ranks = [c.cmdline() for c in agent.children() if c.pid != server.pid]
        handed_over = ["-m", "elastic_train.node.worker", *cluster.entry[2:]]
        assert ranks and all(cmd[-len(handed_over):] == handed_over for cmd in ranks), ranks
        # Forked from the server, which imported torch and the trainer before it served (a fork
        # has the server's imports: test_prefork.py), and never exec'd: its command line is
        # still the agent's. A cold worker's would be its own interpreter's.
        assert trainer.cmdline() == agent.cmdline()

        cluster.kill_worker(0)
        _wait_until(lambda: len(starts()) == 2)
        restarted = cluster.wait_for_workers(0)[0]
        assert restarted.pid != trainer.pid and restarted.ppid() == server.pid
        assert restarted.cmdline() == agent.cmdline()
    assert cluster.tagged_processes() == []
