"""`CheckpointManager`: asynchronous sharded saves with an atomic commit, and resharding loads.

A save stages a host copy of this rank's state (the only part that blocks training), then a
background thread writes it with DCP on the manager's OWN gloo process group (DCP's collectives on
the training group from another thread crash with a collective mismatch), gathers every rank's
file records to rank 0, and rank 0 writes COMMIT.json (`commit.py`), then applies retention.
At most one save is in flight; every rank learns the outcome before the save counts as done.

The manager is a facade: the save itself and its phases are `save_job.py`; the process groups,
collectives and the typed failures that cross ranks are `collectives.py`; what it may be asked to
do is `config.py`. It keeps the public calls, the one-save-in-flight rule, the optimizer fences
of deferred staging, the metrics and the events.

Construct it on every rank after `init_process_group` (if any), in the same order on every rank:
it creates two process groups. Call `save`, `save_within` and `load` at the same step on every rank.
Call `close()` (or `wait()`) before the process exits: the writer thread is a daemon, and one
killed at interpreter exit while inside C++ aborts the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing import events
from checkpointing.cache import LocalCache
from checkpointing.collectives import Failure, RankGroup, describe_error
from checkpointing.commit import (
    CommitInfo,
    VerifyReport,
    list_steps,
    read_commit,
    step_dir,
    verify_step,
)
from checkpointing.config import CheckpointConfig
from checkpointing.dcp_io import ParallelReader
from checkpointing.errors import (
    CheckpointError,
    CorruptCheckpoint,
    Fenced,
    NoSuchCheckpoint,
    SaveAborted,
    SaveFailed,
)
from checkpointing.retention import collect_garbage
from checkpointing.save_job import SaveJob, SaveWriter
from checkpointing.staging import HostStager
from checkpointing.storage import Storage

log = logging.getLogger(__name__)

# DCP warns on every single-process save/load even when asked for one (no_dist=True); a world of
# one is a supported mode here, so that warning is noise. Only that message is filtered.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or "
                        r"uninitialized, assuming the intent", category=UserWarning)

Event = dict[str, Any]


class CheckpointManager:
    """Saves and loads `Stateful` objects under one run URI (see the module docstring).

    `config` says how to save (`CheckpointConfig`; a subclass with more fields is fine, the
    manager reads only its own). `storage_options` go to fsspec (endpoint, credentials, ...) and
    are never logged or written to COMMIT.json. `on_event` receives the events of
    `checkpointing.events` on rank 0 only, from any thread; a callback that raises is logged.

    Failure semantics: a save that fails for good (storage retries exhausted, a rank's writer
    failed, a peer died) leaves the previous commit intact and the failed step uncommitted; it is
    counted in `metrics["failed"]`, reported through `on_event` (rank 0), and with
    `on_failure="stop"` raised as `SaveFailed` by the next `wait()` or `save()` on every rank.
    Raises StorageError if the URI cannot be opened.
    """

    def __init__(self, uri: str | os.PathLike[str], config: CheckpointConfig | None = None,
                 config_digest: str = "", on_event: Callable[[Event], None] | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        # Attributes close() needs come first, so close() is safe if anything below raises.
        self._job: SaveJob | None = None
        self._fences: list[Any] = []
        self._groups: list[RankGroup] = []
        self._closed = False
        self._storage_check: tuple[Future[None], Future[int]] | None = None
        self.config = config or CheckpointConfig()
        self.config_digest = config_digest
        self.on_event = on_event
        self.metrics: dict[str, Any] = {
            "saves_started": 0, "committed": 0, "skipped": 0, "failed": 0, "aborted": 0,
            "waits": 0, "wait_s": 0.0, "last_stall_s": None, "last_commit_s": None,
            "last_committed_step": None, "loads": 0, "last_load_s": None,
            "fence_waits": 0, "last_fence_wait_s": None, "fence_wait_s": 0.0, "fallbacks": 0,
        }
        self._failure: SaveFailed | None = None
        self.storage = Storage(uri, storage_options, self.config.retry_timeout_s)
        self.uri = self.storage.url
        # The writer thread's group first, then the caller's: the same order on every rank.
        timeout_s = self.config.collective_timeout_s
        self._save_ranks = RankGroup(timeout_s)
        self._groups.append(self._save_ranks)
        self._caller_ranks = RankGroup(timeout_s)
        self._groups.append(self._caller_ranks)
        self.rank, self.world_size = self._caller_ranks.rank, self._caller_ranks.world_size
        self._stager = HostStager()
        self._cache = LocalCache(self.config.cache_dir, self.uri) if self.config.cache_dir \
            else None
        self._writer = SaveWriter(self.storage, self.config, self._save_ranks, self._stager,
                                  self._cache, config_digest, report=self._report)

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Save `state` as `step`. Returns False if skipped (when_busy="skip" and busy).

        async: returns once the host copy is staged; sync: once committed or failed. With
        on_failure="stop" raises SaveFailed for an earlier failed save (or, sync, for this one).
        """
        self._check_open()
        self._raise_failure()
        t0 = time.monotonic()
        if self.config.when_busy == "skip":
            if self._caller_ranks.agree_any(self._busy()):
                self.metrics["skipped"] += 1
                log.info("checkpoint step %d skipped: previous save still in flight", step)
                return False
        elif self._busy():
            self._wait_job()
            self.metrics["waits"] += 1
            self.metrics["wait_s"] += time.monotonic() - t0
        self._raise_failure()
        job = self._start(step, state, t0, deadline=None)
        if self.config.mode == "sync":
            job.done.wait()
            self._raise_failure()
        return True

    def save_within(self, step: int, state: Mapping[str, Any], deadline_s: float) -> bool:
        """Blocking save for a preemption notice: True if `step` committed within `deadline_s`.

        Otherwise the save is aborted before COMMIT.json (its data files are debris for GC) and
        False is returned; rank 0's answer is authoritative. Never raises for a failed save.
        """
        self._check_open()
        end = time.monotonic() + deadline_s
        if self._busy() and not self._wait_job(timeout=max(0.0, end - time.monotonic())):
            return False
        job = self._start(step, state, time.monotonic(), deadline=end)
        job.done.wait(timeout=max(0.0, end - time.monotonic()))
        if not job.done.is_set():
            if job.abort_unless_committing():
                return False
            job.done.wait()  # COMMIT.json is being written: its outcome decides
        return job.ok

    def _start(self, step: int, state: Mapping[str, Any], t0: float,
               deadline: float | None) -> SaveJob:
        self._remove_fences()
        defer = (self.config.staging == "deferred" and self.config.mode == "async"
                 and deadline is None)
        job = SaveJob.stage(step, state, self._stager, defer, t0, deadline)
        for key in job.deferred:
            self._install_fence(job, state[key].optimizer)
        self.metrics["saves_started"] += 1
        self.metrics["last_stall_s"] = job.stall_s
        self._job = job
        self._writer.start(job)
        return job

    def _install_fence(self, job: SaveJob, optimizer: Any) -> None:
        """Make the optimizer's next step() wait until the writer thread has copied the state."""

        def fence(*_: Any) -> None:
            if job.staging_done.is_set():
                return
            t0 = time.monotonic()
            job.staging_done.wait()
            waited = time.monotonic() - t0
            job.fence_wait_s += waited
            self.metrics["fence_wait_s"] += waited
            self.metrics["fence_waits"] += 1
            self.metrics["last_fence_wait_s"] = job.fence_wait_s

        # Removed by the caller's thread at the next save/close: removing a hook from inside
        # optimizer.step() would change the dict step() is iterating.
        self._fences.append(optimizer.register_step_pre_hook(fence))

    def _remove_fences(self) -> None:
        self.maybe_wait_for_staging()
        for handle in self._fences:
            handle.remove()
        self._fences = []

    def maybe_wait_for_staging(self, timeout_s: float | None = None) -> bool:
        """Block until the in-flight save no longer reads live state (no-op if it does not),
        or at most `timeout_s`; returns whether it no longer does.

        Must be called before mutating saved tensors other than through the optimizer's step().
        """
        job = self._job
        if job is not None and not job.staging_done.is_set():
            return job.staging_done.wait(timeout_s)
        return True

    def _report(self, job: SaveJob) -> None:
        """The writer thread's report of a final outcome: metrics, log, event, stop policy."""
        commit_s = time.monotonic() - job.started
        failure = job.failure
        if failure is None:
            self.metrics["committed"] += 1
            self.metrics["last_commit_s"] = commit_s
            self.metrics["last_committed_step"] = job.step
            self._emit({"event": events.COMMIT, "step": job.step,
                        "stall_s": job.stall_s + job.fence_wait_s, "commit_s": commit_s})
            return
        aborted = job.aborted or failure.kind is SaveAborted
        self.metrics["aborted"] += int(aborted)
        self.metrics["failed"] += 1
        log.error("checkpoint step %d failed: %s", job.step, failure.describe())
        self._emit({"event": events.SAVE_FAILED, "step": job.step, "error": failure.describe()})
        # A fenced writer stops whatever on_failure says: another job now owns the run.
        if (self.config.on_failure == "stop" or failure.kind is Fenced) and not aborted:
            self._failure = SaveFailed(job.step, failure.describe())

    # -- waiting -------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the in-flight save (if any) committed or failed.

        With on_failure="stop", raises SaveFailed if it (or an earlier save) failed.
        """
        self._wait_job()
        self._raise_failure()

    @property
    def save_in_flight(self) -> bool:
        """True while this rank's last save is still writing or committing."""
        return self._busy()

    def _busy(self) -> bool:
        return self._job is not None and not self._job.done.is_set()

    def _wait_job(self, timeout: float | None = None) -> bool:
        job = self._job
        if job is None:
            return True
        if not job.done.wait(timeout):
            return False
        # Join too: a daemon thread still unwinding C++ frames (freeing DTensors, gloo work) when
        # the interpreter exits aborts the process ("terminate called without an active
        # exception"), seen when a run's last act was a save.
        if job.thread is not None and job.thread is not threading.current_thread():
            job.thread.join()
        return True

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    # -- loading -------------------------------------------------------------------------
    def load(self, state: Mapping[str, Any], step: int | None = None,
             optional: Collection[str] = ()) -> int | None:
        """Load the newest intact committed step (or `step`) into `state`; collective.

        Every byte read is checked against COMMIT.json (sizes, then CRC-32s as the bytes arrive;
        `dcp_io.ParallelReader`). If the newest commit has a bad file, the error names it, a
        `fallback` event is reported and the commit before is tried, and so on: one bad
        checkpoint never stops a run from starting. Returns the step loaded, or None if nothing
        is committed (state untouched). Reshards onto the current world. An entry of `state`
        named in `optional` that the checkpoint lacks (one written before that entry existed)
        keeps its state; any other missing entry fails. Raises NoSuchCheckpoint if `step` is not
        committed, CorruptCheckpoint if `step` (asked for by number) or every commit is bad,
        StorageError if storage fails for good, CheckpointError if DCP fails (e.g. the checkpoint
        does not match the state: a missing key or another shape).
        """
        self._check_open()
        self._wait_job()
        t0 = time.monotonic()
        # Rank 0 lists; NoSuchCheckpoint or StorageError there is raised on every rank.
        candidates = self._caller_ranks.on_rank_zero(lambda: self._candidates(step),
                                                     self.storage.redact)
        bad: CorruptCheckpoint | None = None
        for i, commit_json in enumerate(candidates):
            info = CommitInfo.from_json(commit_json)
            try:
                self._load_commit(info, state, optional)
            except CorruptCheckpoint as e:
                bad = e
                older = (CommitInfo.from_json(candidates[i + 1]).step
                         if i + 1 < len(candidates) else None)
                self._fall_back(info.step, str(e), older)
                continue
            self.metrics["loads"] += 1
            self.metrics["last_load_s"] = time.monotonic() - t0
            return info.step
        if bad is not None:
            raise bad
        return None

    def _candidates(self, step: int | None) -> list[str]:
        """COMMIT.json texts to try, newest first: every commit, or just `step`."""
        if step is None:
            return [info.to_json() for info in reversed(list_steps(self.storage).committed)]
        info = read_commit(self.storage, step)
        if info is None:
            raise NoSuchCheckpoint(f"no committed step {step} under {self.uri}")
        return [info.to_json()]

    def _load_commit(self, info: CommitInfo, state: Mapping[str, Any],
                     optional: Collection[str]) -> None:
        """Load one commit, checked; collective. Raises CorruptCheckpoint on every rank if any
        rank read a file that does not match COMMIT.json."""
        sources = self._cache.sources_for(info) if self._cache is not None else {}
        reader = ParallelReader(self.storage.child(step_dir(info.step)), info.files, sources,
                                threads=self.config.read_threads)
        # DCP swallows errors of read_metadata (it retries it "per rank", then asserts): read
        # and check it here, and agree on the outcome, so a bad one keeps its name and type.
        failure: Failure | None = None
        try:
            saved = {key.split(".", 1)[0] for key in reader.read_metadata().state_dict_metadata}
        except CheckpointError as e:
            failure = Failure.of(e, self.storage.redact)
        failure = self._caller_ranks.first_failure(failure)
        if failure is not None:
            raise failure.error()
        # DCP's metadata names every saved entry by its flattened key, "entry.field...".
        state = {key: value for key, value in state.items()
                 if key in saved or key not in optional}
        state_dicts = {key: value.state_dict() if isinstance(value, Stateful) else value
                       for key, value in state.items()}
        try:
            dcp.load(state_dicts, storage_reader=reader, process_group=self._caller_ranks.group,
                     no_dist=not self._caller_ranks.distributed)
        except CheckpointException as e:
            # DCP gathers every rank's read errors, so every rank sees the same failures here.
            corrupt = _corruption(e)
            if corrupt is not None:
                raise CorruptCheckpoint(self.storage.redact(corrupt)) from e
            # DCP's exception derives from BaseException: callers' `except Exception` would miss it.
            raise CheckpointError(f"loading step {info.step} from {self.uri} failed: "
                                  f"{self.storage.redact(describe_error(e))}") from e
        for key, value in state.items():
            if isinstance(value, Stateful):
                value.load_state_dict(state_dicts[key])
        self.metrics["last_load_from_cache_files"] = len(reader.sources)

    def _fall_back(self, step: int, reason: str, older: int | None) -> None:
        self.metrics["fallbacks"] += 1
        instead = f"falling back to step {older}" if older is not None else "no older commit"
        log.error("CHECKPOINT STEP %d IS CORRUPT, %s: %s", step, instead, reason)
        self._emit({"event": events.FALLBACK, "step": step, "to_step": older,
                    "file": reason.split(": ", 1)[0], "reason": reason})

    # -- inspection and maintenance (local: call from one process) -----------------------------
    def latest_step(self) -> int | None:
        committed = list_steps(self.storage).committed
        return committed[-1].step if committed else None

    def steps(self) -> list[CommitInfo]:
        """Committed steps, oldest first."""
        return list_steps(self.storage).committed

    def verify(self, step: int | None = None, deep: bool = True) -> VerifyReport:
        """Check the step's files against its COMMIT.json (sizes and, deep, CRC-32)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                return VerifyReport(False, None, f"no committed step under {self.uri}")
        info = read_commit(self.storage, step)
        if info is None:
            return VerifyReport(False, step, f"step {step} is not committed under {self.uri}")
        return verify_step(self.storage, info, deep=deep)

    def gc(self, keep: int | None = None) -> list[str]:
        """Apply retention (see `retention.py`); returns the removed URLs. Raises Fenced if this
        manager claimed a writer epoch and a newer writer has claimed the run since."""
        if self._writer.epoch is not None:
            self._writer.check_epoch("collect garbage")
        return collect_garbage(self.storage, self.config.keep if keep is None else keep)

    def close(self) -> None:
        """Wait for the in-flight save, then release the process groups. Safe to call twice and
        on a half-built manager; never raises for a failed save."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if getattr(self, "_job", None) is not None:
            self._wait_job()
        for handle in getattr(self, "_fences", []):
            handle.remove()
        self._fences = []
        for group in getattr(self, "_groups", []):
            group.close()
        self._groups = []

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("CheckpointManager is closed")

    def start_storage_check(self) -> None:
        """Rank 0: start probing the URI (a write, read and delete) and claiming the writer epoch,
        on threads of their own; `check_storage()` waits for them. A (re)start calls this first
        so that the requests overlap its restore instead of preceding it. Raises nothing: the
        outcome is `check_storage()`'s."""
        self._check_open()
        if self.rank != 0 or self._storage_check is not None:
            return
        pool = ThreadPoolExecutor(2, thread_name_prefix="ckpt-check")
        self._storage_check = (pool.submit(self.storage.probe),
                               pool.submit(self._writer.claim_epoch))
        pool.shutdown(wait=False)

    def check_storage(self) -> None:
        """Rank 0: probe the URI and claim the writer epoch (`start_storage_check`), and wait for
        both; collective. Call before training: a missing bucket, missing credentials or a denied
        write then fail here, on every rank, with StorageError naming the URI, instead of as an
        empty run whose saves all fail."""
        self.start_storage_check()

        def finish() -> None:
            assert self._storage_check is not None
            probe, claim = self._storage_check
            probe.result()  # first: its error names what is wrong with the URI
            claim.result()

        self._caller_ranks.on_rank_zero(finish, self.storage.redact)

    @property
    def writer_epoch(self) -> int | None:
        """Rank 0's writer epoch once claimed (`fence.py`); None before, and on other ranks."""
        return self._writer.epoch

    def _emit(self, event: Event) -> None:
        if self.rank != 0 or self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a broken callback must not fail the save
            log.exception("on_event callback failed")


def _corruption(error: CheckpointException) -> str | None:
    """The message of the first CorruptCheckpoint among DCP's per-rank failures, if any."""
    for _, failure in sorted(error.failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CorruptCheckpoint):
            return str(inner)
    return None
