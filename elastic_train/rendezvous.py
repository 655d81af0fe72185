"""How elastic nodes rendezvous: the settings measured on torch 2.13 (../shared/FACTS.md) and
proved by the chaos harness, in one place for the local cluster (`chaos.cluster`) and for real
nodes (`elastic_train.launch`).

torchrun's c10d rendezvous polls its shared state once a second (`_delay(seconds=1)` in the join
loop, and a 1 s state cache) and takes its timeouts in whole seconds, so every re-form costs
several one-second quanta on top of the time to notice a dead node. `--rdzv-backend=c10d-fast` is
the same c10d rendezvous (same store, same state, same protocol) with a configurable poll interval
and fractional timeouts; torchrun finds it through the `torchrun.handlers` entry point."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

FAST_BACKEND = "c10d-fast"
"""The `--rdzv-backend` name of `create_fast_handler` (registered in pyproject.toml)."""


@dataclass(frozen=True)
class RendezvousSettings:
    """torchrun rendezvous settings. `fast()` is what the harness uses; `torch_default()` is
    torch's own c10d rendezvous with its defaults (measured on this machine: 36-41 s to re-form
    after a node is lost or added)."""

    backend: str = FAST_BACKEND
    poll_interval: float | None = 0.1
    """Seconds between polls of the shared state while a node waits to (re)join (torch: 1 s)."""
    last_call_timeout: float | None = 0.5
    """Seconds the rendezvous waits for more nodes once min_nodes have joined. Default 30: every
    re-form after a membership change waited that long. It must cover the spread between the
    survivors of a fault rejoining (they learn of it within the same collective)."""
    keep_alive_interval: float | None = 0.5
    """Seconds between an agent's heartbeats in the store. Default 5."""
    keep_alive_max_attempt: int | None = 3
    """Missed heartbeats before a node counts as dead: 0.5 s x 3 notices a lost node in 1-1.5 s.
    Do not use 2 (measured with 1 s heartbeats: it split one job into two worlds)."""
    join_timeout: int | None = 120
    """Seconds a node waits for a rendezvous to complete before its agent gives up (default 600):
    bounds how long a node outlives a job that finished without it."""

    @classmethod
    def fast(cls) -> RendezvousSettings:
        return cls()

    @classmethod
    def torch_default(cls) -> RendezvousSettings:
        return cls("c10d", None, None, None, None, None)

    def conf(self) -> str:
        # is_host=false: no agent hosts the c10d store; our standalone store process does, so any
        # agent may die without taking the rendezvous (and the job) down with it.
        parts = ["is_host=false"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "backend" and value is not None:
                parts.append(f"{f.name}={value:g}")
        return ",".join(parts)

    def torchrun_args(self, endpoint: str, run_id: str) -> list[str]:
        return [f"--rdzv-backend={self.backend}", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={run_id}", f"--rdzv-conf={self.conf()}"]


def create_fast_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's c10d rendezvous handler with `poll_interval` and fractional timeouts (see the
    module docstring). A bad value fails torchrun at start with a one-line ValueError.

    It reaches two private names of torch 2.13's dynamic rendezvous: the state holder (to pass
    its cache duration) and the join loop's `_delay` (to shorten its one-second poll);
    tests/test_rendezvous.py fails if a torch upgrade moves either."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dyn

    poll_s = _seconds(params, "poll_interval", 0.1)
    timeout = dyn.RendezvousTimeout(
        join=timedelta(seconds=_seconds(params, "join_timeout", 600)),
        last_call=timedelta(seconds=_seconds(params, "last_call_timeout", 30)),
        close=timedelta(seconds=_seconds(params, "close_timeout", 30)),
        heartbeat=timedelta(seconds=_seconds(params, "heartbeat_timeout", 5)),
    )
    settings = dyn.RendezvousSettings(
        params.run_id, params.min_nodes, params.max_nodes, timeout,
        keep_alive_interval=timedelta(seconds=_seconds(params, "keep_alive_interval", 5)),
        keep_alive_max_attempt=int(_seconds(params, "keep_alive_max_attempt", 3, "a count")),
    )
    backend, store = c10d_rendezvous_backend.create_backend(params)
    state_holder = dyn._BackendRendezvousStateHolder(backend, settings, cache_duration=poll_s)
    _poll_every(dyn, poll_s)
    node = dyn.DynamicRendezvousHandler._node_desc_generator.generate(params.local_addr)
    return dyn.DynamicRendezvousHandler(node, settings, FAST_BACKEND, store, state_holder)


def torchrun_handler() -> object:
    """The `torchrun.handlers` entry point: torchrun calls this and registers what it returns."""
    return create_fast_handler


def _seconds(params: RendezvousParameters, key: str, default: float,
             what: str = "a number of seconds") -> float:
    raw = params.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = 0.0
    if value <= 0:
        raise ValueError(f"--rdzv-conf {key}={raw!r}: expected {what} > 0")
    return value


def _poll_every(dyn: ModuleType, poll_s: float) -> None:
    """Make the join loop's one-second state poll take `poll_s`; other delays are unchanged."""
    original = dyn._delay
    original = getattr(original, "__wrapped_delay__", original)

    def delay(seconds: float | tuple[float, float]) -> None:
        original(poll_s if seconds == 1 else seconds)

    delay.__wrapped_delay__ = original  # type: ignore[attr-defined]
    dyn._delay = delay


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
