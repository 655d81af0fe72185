"""The run's home under its URI: everything a run produces, beside its `step_*/` checkpoints.

    {uri}/step_00000040/ ...            checkpoints (checkpointing)
    {uri}/ledger.json                   where the time and money went (goodput.store)
    {uri}/metrics/{t}-{writer}-{n}.jsonl  metrics lines, in segments (this module)
    {uri}/tensorboard/events.out.tfevents.{t}.{writer}.{n}  optional (dashboards)
    {uri}/final/model.safetensors       the final weights (this module)

Object stores cannot append, so rank 0 writes each batch of metrics lines as a new small object
and never rewrites one: `t` is the first line's time in milliseconds (zero-padded, so a listing
sorts segments by time), `writer` is random per process and `n` counts its segments. A relaunch,
a new rank 0 on another node, or another cluster writing to the same URI adds segments; readers
list them and merge them (`RunStore.records`). The local `{run.dir}/metrics.jsonl` stays as it
was (the chaos harness tails it); the segments are the history that outlives the node.

`SegmentSink` is the writer: the step loop hands it each line (a list append under a lock) and a
background thread writes the batch every `flush_s` seconds, at once after a commit, and on
`close()`. What happens on failure: a segment that cannot be written (after Storage's retries)
stays queued under the same name and is written again with the next flush, so a storage outage
delays the history but loses nothing while the process lives; a killed rank 0 loses the lines it
had not flushed (at most `flush_s` seconds' worth, and nothing up to a commit whose flush
finished). A flush never raises into the trainer.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from checkpointing.errors import StorageError
from checkpointing.storage import Storage
from elastic_train.events import Event
from elastic_train.metrics import Record, parse_line
from elastic_train.node.contract import FINAL_WEIGHTS

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
RETRY_TIMEOUT_S = 10.0
"""How long one read or write of the run's history retries transient storage faults; a write
that still fails is tried again with the next flush."""

Consumer = Callable[[list[Record]], None]
"""Called on the sink's thread with each batch once its segment is written (dashboards, the
ledger). Must not raise; what it raises is logged and dropped."""


def new_writer_id() -> str:
    """A name no other process writing to the same URI will use."""
    return uuid.uuid4().hex[:8]


def segment_name(first_time: float, writer: str, seq: int, suffix: str = ".jsonl") -> str:
    """`{ms:013d}-{writer}-{seq:06d}{suffix}`: sorts by time, never collides between writers."""
    return f"{int(first_time * 1000):013d}-{writer}-{seq:06d}{suffix}"


class RunStore:
    """Reads and writes the run's own objects under `uri` (not its checkpoints).

    Every method goes through `checkpointing.storage.Storage` (retries, atomic writes, credentials
    redacted) and raises `StorageError` when storage still fails after RETRY_TIMEOUT_S."""

    def __init__(self, uri: str | Storage, storage_options: Mapping[str, Any] | None = None
                 ) -> None:
        self.storage = uri if isinstance(uri, Storage) else \
            Storage(uri, storage_options, retry_timeout_s=RETRY_TIMEOUT_S)
        self._segments: dict[str, list[Record]] = {}
        """Segments already read or written: they never change, so each is fetched once."""
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.storage.url

    def write_segment(self, name: str, records: Sequence[Record]) -> None:
        """Write `records` as the new segment `name` (one JSON line each)."""
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        self.storage.write_bytes(posixpath.join(METRICS_DIR, name), body)
        with self._lock:
            self._segments[name] = list(records)

    def segment_names(self) -> list[str]:
        """Every segment under the run, in the order their names sort (by first line's time)."""
        return sorted(n for n in self.storage.list_files(METRICS_DIR) if n.endswith(".jsonl"))

    def records(self) -> list[Record]:
        """Every metrics line of the run's whole history (all relaunches, all writers), segment
        by segment in name order. Lines that do not parse or carry no numeric `time` are
        skipped. Reads only segments it has not seen; raises StorageError when listing or
        reading fails."""
        merged: list[Record] = []
        for name in self.segment_names():
            with self._lock:
                known = self._segments.get(name)
            if known is None:
                try:
                    text = self.storage.read_bytes(posixpath.join(METRICS_DIR, name))
                except FileNotFoundError:  # removed between the listing and the read
                    continue
                parsed = (parse_line(line) for line in text.splitlines())
                known = [r for r in parsed
                         if r is not None and isinstance(r.get("time"), (int, float))]
                with self._lock:
                    self._segments[name] = known
            merged.extend(known)
        return merged

    def has_history(self) -> bool:
        """Whether any metrics segment exists under the run."""
        return bool(self.segment_names())

    def write_final_weights(self, weights: Mapping[str, Any]) -> str:
        """Write full CPU tensors as `{uri}/final/model.safetensors`; returns its URL."""
        from checkpointing.export import encode_weights

        self.storage.write_bytes(FINAL_WEIGHTS, encode_weights(dict(weights), "safetensors"))
        return self.storage.url_of(FINAL_WEIGHTS)

    def read_final_weights(self) -> dict[str, Any]:
        """The tensors of `{uri}/final/model.safetensors`. Raises FileNotFoundError when the run
        has not finished (or wrote none)."""
        from safetensors.torch import load

        return load(self.storage.read_bytes(FINAL_WEIGHTS))


class SegmentSink:
    """Batches metrics lines on a background thread into new segments under the run's URI.

    `add(record)` is what the step loop pays: a list append under a lock (`add_s` sums the time
    spent in it, `added` counts the lines, for the benchmark and the trainer's last event). A
    line with a `commit` or `done` event wakes the thread at once. After each segment is
    written, every consumer is called with its batch. `close()` flushes what is left (waiting
    at most `close_timeout_s`) and stops the thread; it never raises.
    """

    def __init__(self, store: RunStore, flush_s: float = 5.0,
                 consumers: Sequence[Consumer] = (), close_timeout_s: float = 60.0) -> None:
        self.store = store
        self.flush_s = flush_s
        self.consumers = list(consumers)
        self.close_timeout_s = close_timeout_s
        self.writer = new_writer_id()
        self.added = 0
        self.add_s = 0.0
        self.segments = 0
        """Segments written (counted, for tests)."""
        self.failures = 0
        """Flushes that could not write their segment (retried with the next flush)."""
        self._pending: list[Record] = []
        self._unwritten: tuple[str, list[Record]] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._asked = 0
        self._done = 0
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="run-store-sink", daemon=True)
        self._thread.start()

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one metrics line (already stamped with `time`). Never blocks on storage."""
        t0 = time.perf_counter()
        with self._lock:
            self._pending.append(dict(record))
            self.added += 1
        if record.get("event") in (Event.COMMIT, Event.DONE):
            self._wake.set()
        self.add_s += time.perf_counter() - t0

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write what is queued now and wait for it; returns False when it is still unwritten
        after `timeout_s` (default: close_timeout_s) or the write failed."""
        with self._flushed:
            self._asked += 1
            ticket = self._asked
        self._wake.set()
        with self._flushed:
            self._flushed.wait_for(lambda: self._done >= ticket,
                                   timeout=self.close_timeout_s if timeout_s is None
                                   else timeout_s)
            ok = self._done >= ticket
        return ok and self._unwritten is None

    def close(self) -> None:
        """Flush what is left and stop the thread; consumers are closed if they can be."""
        if self._closing:
            return
        deadline = time.monotonic() + self.close_timeout_s
        self.flush()
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for consumer in self.consumers:
            close = getattr(consumer, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:  # noqa: BLE001 - a dashboard must not fail the run
                    log.warning("closing %s failed: %s", type(consumer).__name__, e)

    def _loop(self) -> None:
        while not self._closing:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            with self._flushed:
                ticket = self._asked
            self._write_once()
            with self._flushed:
                self._done = max(self._done, ticket)
                self._flushed.notify_all()

    def _write_once(self) -> None:
        """Write the segment left over from a failed flush, then what is queued."""
        while True:
            if self._unwritten is None:
                with self._lock:
                    batch, self._pending = self._pending, []
                if not batch:
                    return
                first = batch[0].get("time", time.time())
                self._unwritten = (segment_name(first, self.writer, self.segments), batch)
            name, batch = self._unwritten
            try:
                self.store.write_segment(name, batch)
            except (StorageError, OSError) as e:
                self.failures += 1
                log.warning("metrics segment %s not written yet (retried with the next "
                            "flush): %s", name, e)
                return
            self._unwritten = None
            self.segments += 1
            for consumer in self.consumers:
                try:
                    consumer(batch)
                except Exception as e:  # noqa: BLE001 - a dashboard must not fail the run
                    log.warning("%s failed on a batch of %d lines: %s", type(consumer).__name__,
                                len(batch), e)
