"""A node's torchrun agent, as a command line and an environment: built here, and only here, for
the SkyPilot launcher (`elastic_train.node.launch`) and for the chaos harness's local cluster.

The agent is `python -m elastic_train.node.launch --agent TORCHRUN_ARGS`: torchrun's elastic
agent in that process (`launch.run_agent`), which first forks the node's prefork server and runs
its hang watchdog. What differs between a cloud node and a loopback one (the rendezvous endpoint
and settings, how often the agent polls its workers, its restart budget, where its files are) is
passed in; the rest is decided here for both.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from elastic_train.node import prefork
from elastic_train.node.contract import NOTICE_FILE_ENV, PREFORK_SOCKET_ENV, TIMER_FILE_ENV
from elastic_train.node.rendezvous import RendezvousSettings
from elastic_train.node.worker import TRAINER_ENTRY, WORKER_ENTRY

DEFAULT_MAX_RESTARTS = 100
"""A restart re-forms the world in seconds; giving up makes SkyPilot relaunch the cluster (minutes).
Each peer lost costs every surviving node one restart, and torchrun never refunds them."""
DEFAULT_MONITOR_INTERVAL_S = 0.1
"""Seconds between the agent's checks of its workers and of the rendezvous: how late it notices
a dead worker or a lost peer, added to every re-form (torchrun: 0.1 s). Each check is a
process poll and at most one read of the rendezvous state, which c10d-fast caches as long."""
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
"""Seconds the agent waits for SIGTERMed workers before SIGKILL (torchrun's default: 30). The
trainer exits at once on SIGTERM; only a wedged worker waits this long."""


def runs_trainer(entry: Sequence[str]) -> bool:
    """Whether torchrun's `entry` is the trainer (`-m elastic_train.train ...`), the one entry a
    prefork server can start warm."""
    return tuple(entry[:2]) == TRAINER_ENTRY


@dataclass(frozen=True)
class AgentCommand:
    """One node's torchrun agent: `argv()` to run, in `env(base)`.

    Raises ValueError when built with a prefork socket for an entry other than the trainer's: the
    server preloads and runs the trainer only."""

    entry: Sequence[str]
    """What torchrun runs for each rank, as `python` takes it: `-m elastic_train.train ARGS`
    (the trainer) or any other module or script with its arguments."""
    min_nodes: int
    max_nodes: int
    procs_per_node: int
    rdzv: RendezvousSettings
    rdzv_endpoint: str
    """host:port of the rendezvous store (which no agent hosts, see `RendezvousSettings.conf`)."""
    run_id: str
    """The rendezvous id: every node of one job passes the same."""
    timer_file: str
    """The FIFO of the node's step timers, served by the agent's hang watchdog."""
    notice_file: str
    """The file whose appearance is this node's preemption notice."""
    prefork_socket: str = ""
    """The unix socket of the node's prefork server: the trainer's ranks then start as warm forks
    (`elastic_train.node.worker`). Empty: every rank starts cold. At most 108 bytes long."""
    local_addr: str = ""
    """This node's address as the others reach it (empty: torchrun finds one)."""
    max_restarts: int = DEFAULT_MAX_RESTARTS
    monitor_interval_s: float = DEFAULT_MONITOR_INTERVAL_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "entry", tuple(self.entry))  # frozen: no list shared with callers
        if self.prefork_socket and not runs_trainer(self.entry):
            raise ValueError(f"a prefork server starts only the trainer ({' '.join(TRAINER_ENTRY)}"
                             f"), not {' '.join(self.entry[:2])}")

    def torchrun_args(self) -> list[str]:
        """torchrun's command line, without `torchrun`."""
        entry = list(self.entry)
        if self.prefork_socket:  # the same trainer arguments, handed to the server
            entry = [*WORKER_ENTRY, *entry[len(TRAINER_ENTRY):]]
        return [
            f"--nnodes={self.min_nodes}:{self.max_nodes}",
            f"--nproc-per-node={self.procs_per_node}",
            *self.rdzv.torchrun_args(self.rdzv_endpoint, self.run_id),
            *([f"--local-addr={self.local_addr}"] if self.local_addr else []),
            f"--max-restarts={self.max_restarts}",
            f"--monitor-interval={self.monitor_interval_s:g}",
            f"--shutdown-timeout={self.shutdown_timeout_s:g}",
            *entry,
        ]

    def argv(self) -> list[str]:
        """The agent's command line: torchrun's agent inside `elastic_train.node.launch`."""
        return [sys.executable, "-m", "elastic_train.node.launch", "--agent",
                *self.torchrun_args()]

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The agent's environment (its workers inherit it): `base` plus what every elastic node
        needs, which overrides `base`."""
        env = {
            **base,
            # Without this, workers share the agent's rendezvous store, and a node joining a
            # running job deadlocks (then the job dies after 60 s).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            # Every node runs procs_per_node workers: torchrun then computes ranks from the
            # node's group rank instead of waiting on the store for every node's role info,
            # a wait that outlived a node lost mid re-form by 60 s, then killed the agent.
            "TORCH_ELASTIC_WORKER_IDENTICAL": "1",
            # Workers arm a step timer on this FIFO (`--parallel.hang_timeout_s`); the agent's
            # watchdog (elastic_train/node/watchdog.py) SIGKILLs a worker whose step overran it.
            # Not TORCHELASTIC_ENABLE_FILE_TIMER: torch 2.13's timer server in the agent then
            # kills the agent too, and with it every node whose healthy ranks waited on the hung
            # one.
            TIMER_FILE_ENV: self.timer_file,
            NOTICE_FILE_ENV: self.notice_file,
            "PYTHONUNBUFFERED": "1",
        }
        # The agent forks a server exactly when this is set: never for an inherited socket.
        env.pop(PREFORK_SOCKET_ENV, None)
        if self.prefork_socket:
            env[PREFORK_SOCKET_ENV] = self.prefork_socket
        return env

    def remove_files(self) -> None:
        """Remove the node's timer FIFO and its prefork server's socket and pid files, once its
        agent is done. Never raises for a file already gone."""
        Path(self.timer_file).unlink(missing_ok=True)
        if self.prefork_socket:
            prefork.remove(self.prefork_socket)

    def clear_notice(self) -> None:
        """Remove a notice left by an earlier agent on this disk (it would make the new workers
        save and leave at once) and create its directory. Raises OSError when it cannot."""
        notice = Path(self.notice_file)
        notice.parent.mkdir(parents=True, exist_ok=True)
        notice.unlink(missing_ok=True)
