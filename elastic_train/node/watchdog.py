"""A node's hang watchdog: `start_watchdog(path)`, a thread of every node's agent
(`python -m elastic_train.node.launch --agent`).

The trainer arms torch elastic's file timer around every step (`--parallel.hang_timeout_s`, a
`FileTimerClient` on `TORCHELASTIC_TIMER_FILE`). Normally the torchrun agent serves that FIFO
(`TORCHELASTIC_ENABLE_FILE_TIMER=1`), but measured on torch 2.13 its FileTimerServer, after
SIGKILLing a worker whose timer expired, SIGKILLs the process it runs in ("Terminating the server
process ... because of expired timers"): the agent. A hung rank then costs its node, and since
the healthy ranks block in a collective with the hung one, their timers expire too and every
agent of the job kills itself. Shortening the collective timeout instead lets the healthy nodes
re-form first, but then the hung node's agent stops its timer server and waits a hard-coded 30 s
for the stopped worker to honour SIGTERM.

This watchdog serves the FIFO for one node instead: it SIGKILLs the expired worker and nothing
else, so the worker's agent sees a failed worker and restarts it at once, like any crash.
"""

from __future__ import annotations

import logging
import os

from torch.distributed.elastic.timer import FileTimerServer

log = logging.getLogger("elastic_train.node.watchdog")


class WorkerOnlyTimerServer(FileTimerServer):
    """A FileTimerServer that never signals its own process."""

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:  # noqa: A002 - torch's name
        if worker_pid == os.getpid():
            return True  # torch's server ends itself after a reap; this one keeps watching
        log.warning("hang: SIGKILL worker %d (step timer expired)", worker_pid)
        return super()._reap_worker(worker_pid, signal)


def start_watchdog(path: str) -> WorkerOnlyTimerServer:
    """Serve the timer FIFO at `path` from a daemon thread of this process; `stop()` it."""
    if not log.handlers:  # reaps go to the node's log with a time, whoever configured logging
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s watchdog %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    server = WorkerOnlyTimerServer(path, "", max_interval=0.1, daemon=True)
    server.start()
    return server

