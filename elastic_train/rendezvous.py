"""How elastic nodes rendezvous: the settings measured on torch 2.13 (../shared/FACTS.md) and
proved by the chaos harness, in one place for the local cluster (`chaos.cluster`) and for real
nodes (`elastic_train.launch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore


@dataclass(frozen=True)
class RendezvousSettings:
    """torchrun rendezvous settings. `fast()` is what the harness uses; `torch_default()` leaves
    torch's defaults (measured on this machine: 36-41 s to re-form after a node is lost or
    added)."""

    last_call_timeout: int | None = 1
    """Seconds the rendezvous waits for more nodes once min_nodes have joined. Default 30: every
    re-form after a membership change waited that long. Whole seconds only."""
    keep_alive_interval: int | None = 1
    """Seconds between an agent's heartbeats in the store. Default 5."""
    keep_alive_max_attempt: int | None = 3
    """Missed heartbeats before a node counts as dead. 1 s x 3 detects a lost node in ~3 s.
    Do not use 2: measured here, it split one job into two worlds."""
    join_timeout: int | None = 120
    """Seconds a node waits for a rendezvous to complete before its agent gives up (default 600):
    bounds how long a node outlives a job that finished without it."""

    @classmethod
    def fast(cls) -> RendezvousSettings:
        return cls()

    @classmethod
    def torch_default(cls) -> RendezvousSettings:
        return cls(None, None, None, None)

    def conf(self) -> str:
        # is_host=false: no agent hosts the c10d store; our standalone store process does, so any
        # agent may die without taking the rendezvous (and the job) down with it.
        parts = ["is_host=false"]
        for key in ("last_call_timeout", "keep_alive_interval", "keep_alive_max_attempt",
                    "join_timeout"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        return ",".join(parts)


def agent_env(timer_file: str) -> dict[str, str]:
    """Environment of a node's torchrun agent (inherited by its workers)."""
    return {
        # Without this, workers share the agent's rendezvous store, and a node joining a running
        # job deadlocks (then the job dies after 60 s).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        # Workers arm a step timer on this FIFO (`--parallel.hang_timeout_s`); the node's
        # watchdog (elastic_train/watchdog.py) SIGKILLs a worker whose step overran it. Not
        # TORCHELASTIC_ENABLE_FILE_TIMER: torch 2.13's timer server in the agent then kills the
        # agent too, and with it every node whose healthy ranks waited on the hung one.
        "TORCHELASTIC_TIMER_FILE": timer_file,
        "PYTHONUNBUFFERED": "1",
    }


def host_store(host: str, port: int) -> TCPStore:
    """The standalone c10d store that agents started with `is_host=false` rendezvous on. It lives
    as long as the returned object (keep a reference); port 0 picks a free one (`.port`)."""
    from torch.distributed import TCPStore

    # wait_for_workers=False: the store must not block for a number of clients; nodes come and go.
    return TCPStore(host, port, is_master=True, wait_for_workers=False)
