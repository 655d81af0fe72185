"""Failures the way spot capacity delivers them, against real torchrun agents (`LocalCluster`) and
the shipped timeouts: a node that vanishes without a word (its whole process tree SIGSTOPped:
sockets stay open, heartbeats stop, no RST), and two nodes lost seconds apart, the second while
the survivor re-forms. Plus the agent's bounded waits, as a unit."""

from __future__ import annotations

import base64
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from chaos.backends import prepared_data
from chaos.cluster import LocalCluster
from chaos.metrics import MetricsTail
from elastic_train.events import Event
from elastic_train.node import launch, procs
from elastic_train.node.agent import AgentCommand
from elastic_train.node.rendezvous import RendezvousSettings


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


def _entry(tmp_path: Path, steps: int) -> list[str]:
    # Only what the machine needs: one thread per worker (several share two cores). Timeouts and
    # detection are the shipped defaults.
    return ["-m", "elastic_train.train", "--model=tiny", f"--steps={steps}", "--run.threads=1",
            f"--run.dir={tmp_path / 'run'}", f"--data.uri={prepared_data(tmp_path / 'cache')}",
            "--checkpoint.every=5"]


class Metrics:
    """metrics.jsonl of the run as it grows (rank 0 of each world writes it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tail = MetricsTail(tmp_path / "run" / "metrics.jsonl")

    def records(self) -> list[dict[str, Any]]:
        self.tail.poll()
        return list(self.tail.records)

    def starts(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == Event.START]

    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "step" in r and "event" not in r]


@pytest.mark.timeout(300)
def test_a_frozen_node_is_dropped_by_its_lapsed_heartbeat_and_the_survivor_trains_on(
        tmp_path: Path) -> None:
    """No collective fails and no timer fires: the survivor's agent sees the frozen node's
    keep-alive lapse and re-forms without spending a restart (a worker failure would)."""
    metrics = Metrics(tmp_path)
    with LocalCluster(tmp_path / "cluster", _entry(tmp_path, 100000), min_nodes=1,
                      max_nodes=2) as cluster:
        cluster.add_node()
        cluster.add_node()
        _wait_until(lambda: any(r.get("event") == Event.COMMIT for r in metrics.records()) and
                    any(r["world_size"] == 2 for r in metrics.steps()), 180,
                    "two nodes training, a checkpoint committed")
        frozen = procs.signal_tree(cluster.node(1).agent.pid, signal.SIGSTOP)
        t_freeze = time.time()
        _wait_until(lambda: any(s["time"] > t_freeze and s["world_size"] == 1
                                for s in metrics.starts()), 120, "a world of one after the freeze")
        start = next(s for s in metrics.starts() if s["time"] > t_freeze)
        _wait_until(lambda: sum(r["time"] > start["time"] for r in metrics.steps()) >= 5, 60,
                    "steps after the re-form")
        assert all(p.status() == psutil.STATUS_STOPPED for p in frozen if p.is_running())
        assert cluster.node(0).running
        # torchrun counts a restart only for failed workers; a re-form for a membership change
        # is free. The freeze was detected as a membership change.
        assert start["restart"] == 0, start
        after = [r for r in metrics.steps() if r["time"] > start["time"]]
        assert all(r["world_size"] == 1 for r in after)
        print(f"frozen node: trained again {after[0]['time'] - t_freeze:.2f} s after the freeze")
        assert start["restored_step"] is not None and after[0]["step"] == start["restored_step"] + 1


class RendezvousState:
    """The job's rendezvous state as the agents share it in the store (torch 2.13's c10d backend:
    a base64 pickle of `_RendezvousState` under `torch.rendezvous.RUN_ID`), read-only."""

    def __init__(self, cluster: LocalCluster) -> None:
        from torch.distributed import TCPStore

        assert cluster.store_port is not None
        self.store = TCPStore("127.0.0.1", cluster.store_port, is_master=False,
                              wait_for_workers=False)
        self.key = f"torch.rendezvous.{cluster.run_id}"

    def read(self) -> Any:
        return pickle.loads(base64.b64decode(self.store.get(self.key)))


@pytest.mark.timeout(420)
def test_two_of_three_nodes_lost_the_second_during_the_re_form_the_survivor_finishes(
        tmp_path: Path) -> None:
    """Node 1 dies; node 2 dies as soon as it is seen in the survivors' next round, mostly before
    that round completes (then the round completes with a dead participant), otherwise before
    or while its workers start. The survivor must not wait for it in rank assignment (torch
    waited 60 s there for its role info, then the agent died with exit code 1); it re-forms
    again without it and finishes.

    The trigger is the round's membership, not its completion: a round of two completes within
    the last call of its first joiner, a window that polling may miss on two busy cores, but node
    2 stays in that round until it is killed, so the loss always lands in the re-form or right
    after it (whether the round had completed is printed)."""
    metrics = Metrics(tmp_path)
    steps = 60
    with LocalCluster(tmp_path / "cluster", _entry(tmp_path, steps), min_nodes=1,
                      max_nodes=3) as cluster:
        for _ in range(3):
            cluster.add_node()
        _wait_until(lambda: any(r["world_size"] == 3 for r in metrics.steps()), 240,
                    "three nodes training")
        rdzv = RendezvousState(cluster)
        formed = rdzv.read()
        assert formed.complete and len(formed.participants) == 3
        cluster.kill_node(1)
        seen: list[Any] = []

        def both_survivors_in_a_later_round() -> bool:
            state = rdzv.read()
            if state.round > formed.round and len(state.participants) == 2:
                seen.append(state)
                return True
            return False

        _wait_until(both_survivors_in_a_later_round, 60, "the survivors re-forming")
        cluster.kill_node(2)
        print(f"node 2 lost in round {seen[0].round} (complete: {seen[0].complete})")
        assert cluster.wait(300), "the survivor did not finish"
        assert cluster.exit_codes()[0] == 0, cluster.node(0).log_path.read_text()[-3000:]
    records = metrics.records()
    assert any(r.get("event") == Event.DONE and r["step"] == steps for r in records)


def test_the_agent_command_takes_no_store_wait_for_ranks() -> None:
    """Every node runs the same number of workers; torchrun then computes ranks without a store
    wait that a node lost mid re-form never answers."""
    command = AgentCommand(entry=["-m", "elastic_train.train"], min_nodes=1, max_nodes=3,
                           procs_per_node=2, rdzv=RendezvousSettings.fast(),
                           rdzv_endpoint="127.0.0.1:1", run_id="r", timer_file="t",
                           notice_file="n")
    env = command.env({"TORCH_ELASTIC_WORKER_IDENTICAL": "0"})
    assert env["TORCH_ELASTIC_WORKER_IDENTICAL"] == "1"
    assert "read_timeout=10" in command.rdzv.conf()
    assert "read_timeout=10" in launch.RDZV.conf()


class _NoStore:
    """A store that fails the test if rank assignment touches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rank assignment used the store ({name})")


def test_bounded_agent_assigns_ranks_without_the_store_and_kills_workers_on_re_form(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.elastic.agent.server.api import WorkerSpec

    agent_class = launch.bounded_agent_class()
    monkeypatch.setenv("TORCH_ELASTIC_WORKER_IDENTICAL", "1")
    spec = WorkerSpec(role="trainer", local_world_size=2, rdzv_handler=None,  # type: ignore
                      entrypoint="python", args=())
    workers = agent_class._assign_worker_ranks(object.__new__(agent_class), _NoStore(), 1, 3,
                                               spec)
    assert [(w.global_rank, w.world_size) for w in workers] == [(2, 6), (3, 6)]

    calls: list[tuple[Any, Any]] = []
    agent = object.__new__(agent_class)
    agent._shutdown_timeout = 5
    agent._shutdown = lambda sig, timeout: calls.append((sig, timeout))  # type: ignore
    agent._stop_workers(None)
    assert calls == [(signal.SIGKILL, 5)]


def test_an_unrecoverable_rendezvous_exits_with_a_code_skypilot_recovers_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than min_nodes within the join timeout (or a store that stopped answering): the
    node exits 75, which sky/train.yaml's recover_on_exit_codes lists; never 0."""
    import torch.distributed.launcher.api as launcher
    import torch.distributed.run as torch_run
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

    def no_quorum(_args: Any) -> None:
        raise RendezvousTimeoutError("the rendezvous did not complete in time")

    monkeypatch.setattr(torch_run, "run", no_quorum)
    monkeypatch.setattr(launcher, "LocalElasticAgent", launcher.LocalElasticAgent)  # restored
    monkeypatch.delenv("ELASTIC_TRAIN_PREFORK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_TIMER_FILE", raising=False)
    code = launch.run_agent(["--nnodes=1", "x.py"])
    assert code == 75
    yaml = (Path(__file__).parents[1] / "sky" / "train.yaml").read_text()
    assert "recover_on_exit_codes: [75" in yaml


class _Client:
    """Records what a FileTimerClient would send to the node's watchdog."""

    def __init__(self) -> None:
        self.acquired: list[float] = []

    def acquire(self, scope: str, expires_at: float) -> None:
        self.acquired.append(expires_at - time.time())

    def release(self, scope: str) -> None:
        pass


def _run_steps(timer: Any, durations: list[float]) -> None:
    clock = iter(t for d in durations for t in (0.0, d))
    timer.clock = lambda: next(clock)
    for _ in durations:
        with timer():
            pass


def test_the_step_timer_is_on_by_default_and_sized_from_measured_steps() -> None:
    from elastic_train.config import ParallelConfig
    from elastic_train.trainer import HANG_STEP_FACTOR, HANG_WINDOW, StepTimer

    cfg = ParallelConfig()
    assert cfg.hang_timeout_s > 0
    # Longer than the heartbeat lapse on a cloud node: a vanished peer re-forms the world first.
    rdzv = launch.RDZV
    assert cfg.hang_timeout_s > rdzv.keep_alive_interval * rdzv.keep_alive_max_attempt
    client = _Client()
    timer = StepTimer(cfg.hang_timeout_s, first_steps_s=20.0, client=client)
    # A slow first step (compilation, allocation) gets the first-steps bound, the warmup ones a
    # multiple of it (here more than the first-steps bound: capped), and the first one does not
    # count towards the p99.
    _run_steps(timer, [15.0, 0.1, 0.1])
    assert [round(a) for a in client.acquired] == [20, 20, 20]
    # After a fast first step (a restarted process, warm), a hang on the next step is found by
    # the floor, not after the whole first-steps bound.
    warm = StepTimer(cfg.hang_timeout_s, first_steps_s=20.0, client=_Client())
    _run_steps(warm, [0.3, 0.1, 0.1])
    assert [round(a) for a in warm.client.acquired] == [20, cfg.hang_timeout_s,
                                                        cfg.hang_timeout_s]
    assert timer.timeout_s() == cfg.hang_timeout_s  # fast steps: the floor
    _run_steps(timer, [4.0] * 5)
    assert timer.timeout_s() == pytest.approx(HANG_STEP_FACTOR * 4.0)  # slow steps: k x p99
    _run_steps(timer, [0.1] * HANG_WINDOW)  # the window moves on
    assert timer.timeout_s() == cfg.hang_timeout_s
    assert StepTimer(0.0, 20.0, client).timeout_s() == 0.0  # 0 turns it off


def test_checkpoint_collectives_are_bounded_by_the_configured_timeout(tmp_path: Path) -> None:
    from elastic_train import distributed
    from elastic_train.config import Config
    from elastic_train.trainer import build_checkpointer

    config = Config()
    config.run.dir = str(tmp_path)
    config.parallel.collective_timeout_s = 7.0
    world = distributed.World(0, 0, 1, __import__("torch").device("cpu"), "gloo")
    manager = build_checkpointer(config, world, lambda _e: None)
    try:
        assert manager.config.collective_timeout_s == 7.0
    finally:
        manager.close()
    config.parallel.collective_timeout_s = 0.0
    assert distributed.collective_timeout(config.parallel, "gloo") == 20.0
    assert distributed.collective_timeout(config.parallel, "nccl") == 600.0


def test_a_node_that_finds_the_job_ended_tells_a_finished_run_from_an_abandoned_one(
        tmp_path: Path) -> None:
    """A replacement that comes after the last step finds the rendezvous closed: it exits 0 when
    the run wrote its final weights (its task must not fail), else JOB_ENDED."""
    from elastic_train.run_store import FINAL_WEIGHTS

    uri = f"file://{tmp_path}/run"
    args = ["--nnodes=1:2", "-m", "elastic_train.node.worker", f"--checkpoint.uri={uri}",
            "--steps=40"]
    assert not launch.run_finished(args)
    (tmp_path / "run" / FINAL_WEIGHTS).parent.mkdir(parents=True)
    (tmp_path / "run" / FINAL_WEIGHTS).write_bytes(b"weights")
    assert launch.run_finished(args)
    assert not launch.run_finished(["--nnodes=1:2", "train.py"]), "no trainer entry: unknown"


def test_a_step_held_up_at_the_checkpoint_fence_does_not_stretch_the_hang_bound() -> None:
    """A storage outage held one step 2.6 s at the fence (soak seed 22): counted as the step's
    own time, it made the bound 5 x 2.9 s for the next hundred steps, and a hang then took
    16.7 s to find. Only the step's own time is measured."""
    from elastic_train.trainer import HANG_WARMUP_STEPS, StepTimer

    fence = {"waited": 0.0}

    def run(timer: StepTimer) -> float:
        _run_steps(timer, [0.3] * (HANG_WARMUP_STEPS + 2))
        fence["waited"] += 2.6  # the next step waits 2.6 s of its 2.9 s at the fence
        waits = iter([fence["waited"] - 2.6, fence["waited"]])
        timer.waited_s = lambda: next(waits)
        _run_steps(timer, [2.9])
        timer.waited_s = lambda: fence["waited"]
        return timer.timeout_s()

    assert run(StepTimer(8.0, first_steps_s=20.0, client=_Client())) == 8.0
    # Without the fence's account, the same steps stretch the bound past the floor.
    blind = StepTimer(8.0, first_steps_s=20.0, client=_Client())
    _run_steps(blind, [0.3] * (HANG_WARMUP_STEPS + 2) + [2.9])
    assert blind.timeout_s() > 8.0
