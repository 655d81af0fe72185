"""ledger.json beside the checkpoints: read it, write it, keep it current from rank 0, and read
the run's whole metrics history from its URI.

The ledger is computed from records: a local metrics.jsonl, or (on rank 0, and for
`elastic-train report RUN_URI`) every metrics segment under the run URI (`run_store`), so it
covers all relaunches, regions and world sizes, whichever node's disk is gone. Every read and
write goes through `checkpointing.storage.Storage` (its retries, atomic writes and credential
redaction), at the run's checkpoint URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from checkpointing.errors import StorageError
from checkpointing.storage import Storage
from elastic_train.events import Event
from elastic_train.goodput.ledger import (
    DEFAULT_RESTART_ALLOWANCE_S,
    Ledger,
    Prices,
    compute_ledger,
)
from elastic_train.metrics import Record, read_records
from elastic_train.run_store import RunStore

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
RETRY_TIMEOUT_S = 10.0
"""How long one read or write of ledger.json retries transient storage faults. The ledger is a
report, not state: a write that still fails is skipped, and the next commit writes it again."""


RecordSource = str | Callable[[], list[Record]]
"""Where a ledger's records come from: a metrics.jsonl path, or a function returning them (the
run's history under its URI: `RunStore.records`)."""


def _records(source: RecordSource) -> list[Record]:
    return read_records(source) if isinstance(source, str) else source()


def read_history(run_uri: str | Storage, storage_options: Mapping[str, Any] | None = None
                 ) -> list[Record]:
    """Every metrics line under `run_uri`, from all relaunches ([] when it has none). Raises
    OSError when the URI cannot be opened or listed (after retrying)."""
    storage = run_uri if isinstance(run_uri, Storage) else open_storage(run_uri, storage_options)
    try:
        return RunStore(storage).records()
    except StorageError as e:
        raise OSError(str(e)) from e


def open_storage(run_uri: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage under `run_uri` (a URL or a local path). Raises OSError when fsspec cannot
    open it."""
    try:
        return Storage(run_uri, storage_options, retry_timeout_s=RETRY_TIMEOUT_S)
    except (StorageError, ValueError) as e:
        raise OSError(str(e)) from e


def read_ledger(run_uri: str | Storage, storage_options: Mapping[str, Any] | None = None
                ) -> Ledger | None:
    """The ledger.json under `run_uri`, or None when there is none. Raises OSError when it
    cannot be read (after retrying for RETRY_TIMEOUT_S), ValueError when it is not a ledger."""
    storage = run_uri if isinstance(run_uri, Storage) else open_storage(run_uri, storage_options)
    try:
        data = storage.read_bytes(LEDGER_FILE)
    except FileNotFoundError:
        return None
    except StorageError as e:
        raise OSError(str(e)) from e
    return Ledger.from_dict(json.loads(data))


def write_ledger(run_uri: str | Storage, metrics: RecordSource, prices: Prices | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 restart_allowance_s: float = DEFAULT_RESTART_ALLOWANCE_S) -> Ledger | None:
    """Compute the ledger from `metrics` and write `{run_uri}/ledger.json`; returns it.
    Rank 0 calls it (after a commit, and at the end). Never raises: on any failure it logs
    a warning and returns None, because a ledger must never stop training. Readers see the
    previous ledger.json or the whole new one, never a torn one."""
    try:
        ledger = compute_ledger(_records(metrics), prices or Prices.from_env(),
                                restart_allowance_s)
        storage = run_uri if isinstance(run_uri, Storage) else open_storage(run_uri,
                                                                            storage_options)
        storage.write_bytes(LEDGER_FILE, json.dumps(ledger.to_dict(), indent=1).encode())
        return ledger
    except Exception as e:  # noqa: BLE001 - see docstring: never fail the trainer
        where = run_uri.url if isinstance(run_uri, Storage) else run_uri
        log.warning("ledger not written to %s: %s", where, e)
        return None


class LedgerWriter:
    """Keeps `{run_uri}/ledger.json` current from rank 0's checkpoint events.

    Pass every event dict the checkpoint manager reports to `on_event` (once it is where
    `metrics` reads: the trainer passes each batch its segment sink has written to `on_batch`);
    on a `commit` it rewrites the ledger, at most once per `min_interval_s` so
    frequent small saves do not reread the metrics each time. Call `write()` once at the end.
    Like `write_ledger`, it never raises. Safe from any thread: a write asked for while
    another is under way is skipped (the one under way is as good).
    """

    def __init__(self, run_uri: str, metrics: RecordSource, prices: Prices | None = None,
                 min_interval_s: float = 10.0,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.run_uri, self.metrics = run_uri, metrics
        self.prices = prices or Prices.from_env()
        self.min_interval_s = min_interval_s
        self.storage_options = storage_options
        self._storage: Storage | None = None
        self._last = -math.inf
        self.writes = 0
        """Ledgers written (a test's counter, and a sign of life)."""
        self._lock = threading.Lock()

    def on_event(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == Event.COMMIT and \
                time.monotonic() - self._last >= self.min_interval_s:
            self.write()

    def on_batch(self, batch: list[Record]) -> None:
        """A segment consumer: `on_event` for each commit in a batch just written."""
        for record in batch:
            self.on_event(record)

    def write(self) -> Ledger | None:
        """Write the ledger now; returns it, or None when it was not written."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._last = time.monotonic()
            if self._storage is None:
                with contextlib.suppress(OSError):  # write_ledger tries again and says why
                    self._storage = open_storage(self.run_uri, self.storage_options)
            written = write_ledger(self._storage or self.run_uri, self.metrics,
                                   self.prices, self.storage_options)
            self.writes += written is not None
            return written
        finally:
            self._lock.release()
