"""The `coord` task of a SkyPilot job group (`python -m elastic_train.node.coordinator`), and the
record through which the group's worker tasks find it.

The coordinator hosts the standalone rendezvous store (`rendezvous.host_store`) and nothing else:
no training state lives on it, so losing it costs a re-form, never a committed step. It is a
cluster of its own, so the workers cannot know its address from SkyPilot's variables (and must
never use its public IP: the store is unauthenticated). Instead it writes a record under the
run's URI, through `checkpointing.storage.Storage`:

    {run}/coordinator/{SKYPILOT_MANAGED_JOB_ID}/epoch-{N:08d}.json
        {"epoch": N, "address": "PRIVATE_IP:PORT", "job_id": ..., "task_id": ...}

keyed on the managed job id, which every task of the group shares (unlike SKYPILOT_TASK_ID), so a
new job resuming the same run never reads an old job's coordinator. Each start of a coordinator
(a SkyPilot recovery, possibly on a new node with a new address) writes the next epoch as a new
object; no record is ever overwritten by an older coordinator. (The next epoch is the highest
listed plus one: SkyPilot runs one cluster per task at a time, so two coordinators of one job
never start together.) Readers (`Records.newest`) take
the highest epoch and never go back to a lower one: a stale record is not trusted once a newer
epoch exists, even if a listing briefly misses the newer one.

Every `REFRESH_S` the coordinator checks its record: when a newer epoch exists (it was replaced
while cut off) it exits 0 and its store goes with it; when its record vanished it writes it again.

Environment: BUCKET, RUN_NAME (as the worker tasks), RDZV_PORT (default 29400; 0 picks a free
port, which the record carries), SKYPILOT_MANAGED_JOB_ID, SKYPILOT_JOBGROUP_NAME,
SKYPILOT_NODE_IPS (the first line is this node's private address), SKYPILOT_TASK_ID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from checkpointing.errors import StorageError
from checkpointing.storage import Storage
from elastic_train import exit_codes
from elastic_train.node.launch import DEFAULT_RDZV_PORT, LaunchError, int_env, run_uri
from elastic_train.node.rendezvous import host_store

RECORD_DIR = "coordinator"
REFRESH_S = 10.0
"""Seconds between the coordinator's checks of its own record."""
RECORD_RETRY_S = 30.0
"""Longest one record read or write retries a storage fault before it fails."""
_EPOCH_FILE = re.compile(r"^epoch-(\d{8})\.json$")


@dataclass(frozen=True)
class GroupTask:
    """One task of a job group, as SkyPilot's variables describe it."""

    job_id: str
    """SKYPILOT_MANAGED_JOB_ID: the same for every task of the group, across recoveries."""
    run_id: str
    """The rendezvous id and default run name: `{SKYPILOT_JOBGROUP_NAME}-{job_id}`."""
    run_uri: str
    ip: str
    """This node's private address (SKYPILOT_NODE_IPS: one line, a task is one node)."""
    task_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GroupTask:
        """Raises LaunchError naming the first missing variable."""
        for key in ("SKYPILOT_MANAGED_JOB_ID", "SKYPILOT_NODE_IPS", "SKYPILOT_TASK_ID"):
            if not env.get(key, "").strip():
                raise LaunchError(f"{key} is not set: run this as a task of a SkyPilot job "
                                  "group (sky jobs launch)")
        job_id = env["SKYPILOT_MANAGED_JOB_ID"].strip()
        run_id = f"{env.get('SKYPILOT_JOBGROUP_NAME', '').strip() or 'group'}-{job_id}"
        ips = [line.strip() for line in env["SKYPILOT_NODE_IPS"].splitlines() if line.strip()]
        return cls(job_id=job_id, run_id=run_id, run_uri=run_uri(env, run_id), ip=ips[0],
                   task_id=env["SKYPILOT_TASK_ID"].strip())


@dataclass(frozen=True)
class Record:
    epoch: int
    address: str
    """host:port of the rendezvous store, a private address."""
    job_id: str
    task_id: str = ""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)


class Records:
    """The coordinator records of one managed job under a run's URI (see the module docstring).

    Storage faults are retried for `retry_s`, then raise StorageError."""

    def __init__(self, uri: str, job_id: str, retry_s: float = RECORD_RETRY_S) -> None:
        self.storage = Storage(uri, retry_timeout_s=retry_s).child(RECORD_DIR, job_id)
        self.job_id = job_id
        self.newest_seen = -1
        """The highest epoch this reader has seen: it never trusts a lower one again."""

    def epochs(self) -> list[int]:
        return sorted(int(m.group(1)) for name in self.storage.list_dirs()
                      if (m := _EPOCH_FILE.match(name)))

    def newest(self) -> Record | None:
        """The record of the highest epoch, or None when there is none (yet), when it cannot be
        read, or when the listing shows nothing as new as an epoch seen before."""
        epochs = self.epochs()
        if not epochs or epochs[-1] < self.newest_seen:
            return None
        epoch = epochs[-1]
        try:
            data = json.loads(self.storage.read_bytes(_name(epoch)))
            record = Record(**data)
        except (FileNotFoundError, ValueError, TypeError):
            return None  # deleted meanwhile, or not ours: as if absent
        if record.epoch != epoch or record.job_id != self.job_id:
            return None
        self.newest_seen = epoch
        return record

    def publish(self, address: str, task_id: str = "") -> Record:
        """Write the next epoch's record for the store at `address` and return it."""
        record = Record(epoch=(self.epochs() or [0])[-1] + 1, address=address,
                        job_id=self.job_id, task_id=task_id)
        self.rewrite(record)
        self.newest_seen = record.epoch
        return record

    def rewrite(self, record: Record) -> None:
        self.storage.write_bytes(_name(record.epoch), json.dumps(asdict(record)).encode())

    def superseded(self, record: Record) -> bool:
        """Whether a coordinator newer than `record`'s has written its own."""
        return (self.epochs() or [0])[-1] > record.epoch


def _name(epoch: int) -> str:
    return f"epoch-{epoch:08d}.json"


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout_s`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def run_coordinator(env: Mapping[str, str] | None = None,
                    stop: threading.Event | None = None) -> int:
    """Host the store, publish its record, keep it current until SIGTERM/SIGINT (or `stop`), or
    until a newer coordinator has published (then exit 0). Exits BAD_CONFIG with one line for a
    bad environment, 1 when the record cannot be written."""
    env = dict(os.environ if env is None else env)
    stop = stop or threading.Event()
    try:
        task = GroupTask.from_env(env)
        port = int_env(env, "RDZV_PORT", default=DEFAULT_RDZV_PORT)
    except LaunchError as e:
        print(f"elastic-train coordinator: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store = host_store(task.ip, port)
    records = Records(task.run_uri, task.job_id)
    try:
        record = records.publish(f"{task.ip}:{store.port}", task.task_id)
    except StorageError as e:
        print(f"elastic-train coordinator: error: cannot publish the store's address: {e}",
              file=sys.stderr)
        return 1
    print(f"elastic-train coordinator: store at {record.address}, epoch {record.epoch}, run "
          f"{task.run_uri}", flush=True)
    while not stop.wait(REFRESH_S):
        try:
            if records.superseded(record):
                print(f"elastic-train coordinator: epoch {record.epoch} was superseded; "
                      "leaving", flush=True)
                return exit_codes.OK
            if not records.storage.exists(_name(record.epoch)):
                records.rewrite(record)
        except StorageError as e:  # the store keeps serving; the record is checked again later
            print(f"elastic-train coordinator: cannot check the record: {e}", file=sys.stderr,
                  flush=True)
    del store
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(run_coordinator())
