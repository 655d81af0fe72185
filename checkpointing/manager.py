"""`CheckpointManager`: asynchronous sharded saves with an atomic commit, and resharding loads.

A save stages a host copy of this rank's state (the only part that blocks training), then a
background thread writes it with DCP on the manager's OWN gloo process group (DCP's collectives on
the training group from another thread crash with a collective mismatch), gathers every rank's
file records to rank 0, and rank 0 writes COMMIT.json (`commit.py`), then applies retention.
At most one save is in flight; every rank learns the outcome before the save counts as done.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing.cache import LocalCache
from checkpointing.commit import (
    COMMIT_FILE,
    CommitInfo,
    FileRecord,
    VerifyReport,
    list_steps,
    new_commit,
    read_commit,
    step_dir,
    verify_step,
    write_commit,
)
from checkpointing.dcp_io import ParallelReader, RecordingWriter
from checkpointing.errors import CheckpointError, NoSuchCheckpoint, SaveFailed
from checkpointing.retention import collect_garbage
from checkpointing.staging import HostStager
from checkpointing.state import ModelOptimizerState
from checkpointing.storage import Storage, redact

log = logging.getLogger(__name__)

# DCP warns on every single-process save/load even when asked for one (no_dist=True); a world of
# one is a supported mode here, so that warning is noise. Only that message is filtered.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or "
                        r"uninitialized, assuming the intent", category=UserWarning)

Event = dict[str, Any]


@dataclass
class CheckpointSettings:
    """How the manager saves. Invalid values raise ValueError naming the field and the value."""

    keep: int = 3
    """Committed steps kept after each commit (>= 1). The only commit is never deleted."""
    mode: Literal["async", "sync"] = "async"
    """async: `save` returns after staging a host copy; sync: `save` returns once committed."""
    when_busy: Literal["wait", "skip"] = "wait"
    """A save is due while the previous one is in flight: wait for it, or skip (all ranks agree)."""
    on_failure: Literal["continue", "stop"] = "continue"
    """After a save fails for good: keep going (reported), or raise `SaveFailed` (wait/save)."""
    cache_dir: str | None = None
    """Node-local cache of the newest checkpoint (None or "": no cache)."""
    retry_timeout_s: float = 60.0
    """Total time one storage operation (a file upload, a ranged read, a listing) may retry."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec (endpoint, credentials, ...). Never logged or written to COMMIT.json."""
    staging: Literal["deferred", "blocking"] = "deferred"
    """deferred: for `ModelOptimizerState` values of an async save, `save` returns at once and the
    writer thread copies them to host memory; their optimizer's next `step()` waits until that copy
    is done (a step pre-hook), so the copy overlaps forward and backward. Anything else that
    mutates the saved tensors before then must call `maybe_wait_for_staging()` first.
    blocking: `save` copies everything before it returns."""
    write_threads: int = 2
    """Files written (and uploaded) concurrently per rank."""
    read_threads: int = 8
    """Ranged reads in flight per rank during a load."""
    collective_timeout_s: float = 600.0
    """Timeout of the manager's own gloo groups: how long a rank waits for a dead peer mid-save."""

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.keep, int) and self.keep >= 1, f"keep={self.keep!r} must be >= 1"),
            (self.mode in ("async", "sync"), f"mode={self.mode!r} must be 'async' or 'sync'"),
            (self.when_busy in ("wait", "skip"),
             f"when_busy={self.when_busy!r} must be 'wait' or 'skip'"),
            (self.on_failure in ("continue", "stop"),
             f"on_failure={self.on_failure!r} must be 'continue' or 'stop'"),
            (self.retry_timeout_s >= 0, f"retry_timeout_s={self.retry_timeout_s!r} must be >= 0"),
            (self.staging in ("deferred", "blocking"),
             f"staging={self.staging!r} must be 'deferred' or 'blocking'"),
            (self.write_threads >= 1, f"write_threads={self.write_threads!r} must be >= 1"),
            (self.read_threads >= 1, f"read_threads={self.read_threads!r} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"CheckpointSettings: {message}")


def describe_error(error: BaseException) -> str:
    """One line naming the root cause: DCP's CheckpointException carries a traceback per rank."""
    if isinstance(error, CheckpointException):
        parts = []
        for rank, failure in sorted(error.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {describe_error(inner)}")
        text = "; ".join(parts) or "CheckpointException"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:1000]


class _SaveJob:
    """One save: staged state plus the outcome, shared between the caller and the writer thread."""

    def __init__(self, step: int, staged: dict[str, Any], started: float, stall_s: float,
                 deadline: float | None, deferred: list[str]) -> None:
        self.step = step
        self.staged: dict[str, Any] | None = staged
        self.deferred = deferred  # keys of `staged` still holding live state, copied by the thread
        self.staging_done = threading.Event()
        if not deferred:
            self.staging_done.set()
        self.fence_wait_s = 0.0
        self.started = started
        self.stall_s = stall_s
        self.deadline = deadline
        self.done = threading.Event()
        self.ok = False
        self.error = ""
        self.lock = threading.Lock()
        self.aborted = False  # set by save_within at its deadline; checked before COMMIT.json
        self.committing = False
        self.thread: threading.Thread | None = None

    def may_commit(self) -> bool:
        """Rank 0 calls this right before writing COMMIT.json: the last point to abort."""
        with self.lock:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.aborted = True
            if self.aborted:
                return False
            self.committing = True
            return True


class CheckpointManager:
    """Saves and loads `Stateful` objects under one run URI (see the module docstring).

    Failure semantics: a save that fails for good (storage retries exhausted, a rank's writer
    failed, a peer died) leaves the previous commit intact and the failed step uncommitted; it is
    counted in `metrics["failed"]`, reported through `on_event` (rank 0), and with
    `on_failure="stop"` raised as `SaveFailed` by the next `wait()` or `save()` on every rank.
    """

    def __init__(self, uri: str | os.PathLike[str], settings: CheckpointSettings | None = None,
                 config_digest: str = "", on_event: Callable[[Event], None] | None = None) -> None:
        # Attributes close() needs come first, so close() is safe if anything below raises.
        self._job: _SaveJob | None = None
        self._fences: list[Any] = []
        self._groups: list[Any] = []
        self._closed = False
        self.settings = settings or CheckpointSettings()
        self.config_digest = config_digest
        self.on_event = on_event
        self.metrics: dict[str, Any] = {
            "saves_started": 0, "committed": 0, "skipped": 0, "failed": 0, "aborted": 0,
            "waits": 0, "wait_s": 0.0, "last_stall_s": None, "last_commit_s": None,
            "last_committed_step": None, "loads": 0, "last_load_s": None,
            "fence_waits": 0, "last_fence_wait_s": None,
        }
        self._failure: SaveFailed | None = None
        self.storage = Storage(uri, self.settings.storage_options, self.settings.retry_timeout_s)
        self.uri = self.storage.url
        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1
        if self._distributed:
            timeout = timedelta(seconds=self.settings.collective_timeout_s)
            # Background saves get a group of their own; main-thread agreements another, so the
            # two threads never interleave collectives on one group.
            self._save_group = dist.new_group(backend="gloo", timeout=timeout)
            self._groups.append(self._save_group)
            self._ctl_group = dist.new_group(backend="gloo", timeout=timeout)
            self._groups.append(self._ctl_group)
        else:
            self._save_group = self._ctl_group = None
        self._stager = HostStager()
        cache_dir = self.settings.cache_dir
        self._cache = LocalCache(cache_dir, self.uri) if cache_dir else None

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Save `state` as `step`. Returns False if skipped (when_busy="skip" and busy).

        async: returns once the host copy is staged; sync: once committed or failed. With
        on_failure="stop" raises SaveFailed for an earlier failed save (or, sync, for this one).
        """
        self._check_open()
        self._raise_failure()
        t0 = time.monotonic()
        if self.settings.when_busy == "skip":
            if self._agree_any(self._busy()):
                self.metrics["skipped"] += 1
                log.info("checkpoint step %d skipped: previous save still in flight", step)
                return False
        elif self._busy():
            self._wait_job()
            self.metrics["waits"] += 1
            self.metrics["wait_s"] += time.monotonic() - t0
        self._raise_failure()
        job = self._start(step, state, t0, deadline=None)
        if self.settings.mode == "sync":
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
        t0 = time.monotonic()
        job = self._start(step, state, t0, deadline=end)
        job.done.wait(timeout=max(0.0, end - time.monotonic()))
        if not job.done.is_set():
            with job.lock:
                if not job.committing:
                    job.aborted = True
            if job.aborted:
                return False
            job.done.wait()  # COMMIT.json is being written: its outcome decides
        return job.ok

    def _start(self, step: int, state: Mapping[str, Any], t0: float,
               deadline: float | None) -> _SaveJob:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._remove_fences()
        live = {key: value.state_dict() if isinstance(value, Stateful) else value
                for key, value in state.items()}
        defer_ok = (self.settings.staging == "deferred" and self.settings.mode == "async"
                    and deadline is None)
        deferred = [key for key, value in state.items() if defer_ok
                    and isinstance(value, ModelOptimizerState) and value.optimizer is not None]
        staged = {key: value if key in deferred else self._stager.stage(value, key)
                  for key, value in live.items()}
        stall = time.monotonic() - t0
        job = _SaveJob(step, staged, t0, stall, deadline, deferred)
        for key in deferred:
            self._install_fence(job, state[key].optimizer)
        self.metrics["saves_started"] += 1
        self.metrics["last_stall_s"] = stall
        self._job = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"ckpt-save-{step}",
                                      daemon=True)
        job.thread.start()
        return job

    def _install_fence(self, job: _SaveJob, optimizer: Any) -> None:
        """Make the optimizer's next step() wait until the writer thread has copied the state."""

        def fence(*_: Any) -> None:
            if job.staging_done.is_set():
                return
            t0 = time.monotonic()
            job.staging_done.wait()
            job.fence_wait_s += time.monotonic() - t0
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

    def maybe_wait_for_staging(self) -> None:
        """Block until the in-flight save no longer reads live state (no-op if it does not).

        Must be called before mutating saved tensors other than through the optimizer's step().
        """
        job = self._job
        if job is not None and not job.staging_done.is_set():
            job.staging_done.wait()

    def _run(self, job: _SaveJob) -> None:
        """The writer thread's body: whatever happens, the job ends committed or failed."""
        try:
            self._run_phases(job)
        except BaseException as e:  # noqa: BLE001 - e.g. a collective timed out: a peer died
            job.staging_done.set()
            if not job.done.is_set():
                self._finish(job, redact(describe_error(e), self.settings.storage_options))

    def _run_phases(self, job: _SaveJob) -> None:
        """Every rank runs the same collectives whatever fails in its own phases, so no rank
        waits on a collective its peers skipped. A collective that itself fails (a dead peer)
        raises out of here and fails the save on this rank."""
        step_storage = self.storage.child(step_dir(job.step))
        error = ""
        # Phase 0: copy deferred state to host memory; the optimizer fence waits for this.
        if job.deferred:
            assert job.staged is not None
            try:
                staged = job.staged
                error = self._attempt(lambda: staged.update(
                    {key: self._stager.stage(staged[key], key) for key in job.deferred}))
            finally:
                job.staging_done.set()
        # Phase 1: rank 0 clears leftovers of an earlier attempt at this step.
        if self.rank == 0 and not error:
            error = self._attempt(lambda: self._clear_step(job.step))
        error = self._first_error(error)
        records: dict[str, FileRecord] = {}
        # Phase 2: DCP writes every rank's files and rank 0's .metadata (collective).
        if not error:
            tee = None
            if self._cache is not None:
                tee = self._cache.step_storage(job.step)
            writer = RecordingWriter(step_storage, self.settings.write_threads, tee=tee)

            def write() -> None:
                dcp.save(job.staged, storage_writer=writer, process_group=self._save_group,
                         no_dist=not self._distributed)

            error = self._attempt(write)
            records = writer.records
        job.staged = None  # the stager keeps the buffers; drop our reference early
        # Phase 3: rank 0 gathers all records and commits.
        gathered = self._gather((error, records))
        if self.rank == 0:
            errors = [e for e, _ in gathered if e]
            error = errors[0] if errors else ""
            if not error:
                files: dict[str, FileRecord] = {}
                for _, recs in gathered:
                    files.update(recs)
                info = new_commit(job.step, self.world_size, self.config_digest, files)
                if job.may_commit():
                    error = self._attempt(lambda: write_commit(self.storage, info))
                else:
                    error = "aborted: deadline passed before commit"
        error = self._broadcast(error)
        self._finish(job, error)

    def _finish(self, job: _SaveJob, error: str) -> None:
        commit_s = time.monotonic() - job.started
        if not error:
            job.ok = True
            self.metrics["committed"] += 1
            self.metrics["last_commit_s"] = commit_s
            self.metrics["last_committed_step"] = job.step
            self._emit({"event": "commit", "step": job.step,
                        "stall_s": job.stall_s + job.fence_wait_s,
                        "commit_s": commit_s})
            if self.rank == 0:
                self._attempt(lambda: collect_garbage(self.storage, self.settings.keep),
                              what="retention")
            if self._cache is not None:
                self._cache.prune(job.step)
        else:
            job.error = error
            if job.aborted or error.startswith("aborted"):
                self.metrics["aborted"] += 1
            self.metrics["failed"] += 1
            log.error("checkpoint step %d failed: %s", job.step, error)
            self._emit({"event": "save_failed", "step": job.step, "error": error})
            if self.settings.on_failure == "stop" and not job.aborted:
                self._failure = SaveFailed(job.step, error)
        job.done.set()

    def _clear_step(self, step: int) -> None:
        if read_commit(self.storage, step) is not None:
            self.storage.remove([f"{step_dir(step)}/{COMMIT_FILE}"])
        self.storage.remove_tree(step_dir(step))

    def _attempt(self, fn: Callable[[], Any], what: str = "save") -> str:
        """Run fn; return "" or a one-line, redacted description of what it raised.

        Catches BaseException on purpose: DCP's CheckpointException derives from it. A
        KeyboardInterrupt or SystemExit in this thread is still reported as a failure.
        """
        try:
            fn()
            return ""
        except BaseException as e:  # noqa: BLE001
            text = redact(describe_error(e), self.settings.storage_options)
            if what != "save":
                log.warning("%s failed: %s", what, text)
            return text

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
    def load(self, state: Mapping[str, Any], step: int | None = None) -> int | None:
        """Load the newest committed step (or `step`) into `state`; collective.

        Returns the step loaded, or None if nothing is committed (state untouched). Reshards onto
        the current world. Raises NoSuchCheckpoint if `step` is not committed, StorageError if
        storage fails for good, CheckpointError if DCP fails (e.g. the checkpoint does not match
        the state: a missing key or another shape).
        """
        self._check_open()
        self._wait_job()
        t0 = time.monotonic()
        decision: tuple[str, str] = ("", "")
        if self.rank == 0:
            try:
                decision = ("", self._choose(step))
            except CheckpointError as e:
                decision = (f"{type(e).__name__}: {e}", "")
        error, commit_json = self._broadcast(decision, group=self._ctl_group)
        if error:
            if error.startswith("NoSuchCheckpoint"):
                raise NoSuchCheckpoint(error.split(": ", 1)[1])
            raise CheckpointError(error)
        if not commit_json:
            return None
        info = CommitInfo.from_json(commit_json)
        sources = self._cache.sources_for(info) if self._cache is not None else {}
        reader = ParallelReader(self.storage.child(step_dir(info.step)), sources,
                                threads=self.settings.read_threads)
        state_dicts = {key: value.state_dict() if isinstance(value, Stateful) else value
                       for key, value in state.items()}
        try:
            dcp.load(state_dicts, storage_reader=reader, process_group=self._ctl_group,
                     no_dist=not self._distributed)
        except CheckpointException as e:
            # DCP's exception derives from BaseException: callers' `except Exception` would miss it.
            raise CheckpointError(f"loading step {info.step} from {self.uri} failed: "
                                  f"{redact(describe_error(e), self.settings.storage_options)}"
                                  ) from e
        for key, value in state.items():
            if isinstance(value, Stateful):
                value.load_state_dict(state_dicts[key])
        self.metrics["loads"] += 1
        self.metrics["last_load_s"] = time.monotonic() - t0
        self.metrics["last_load_from_cache_files"] = len(sources)
        return info.step

    def _choose(self, step: int | None) -> str:
        if step is None:
            committed = list_steps(self.storage).committed
            return committed[-1].to_json() if committed else ""
        info = read_commit(self.storage, step)
        if info is None:
            raise NoSuchCheckpoint(f"no committed step {step} under {self.uri}")
        return info.to_json()

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
        """Apply retention (see `retention.py`); returns the removed URLs."""
        return collect_garbage(self.storage, self.settings.keep if keep is None else keep)

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
            try:
                dist.destroy_process_group(group)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log.debug("destroy_process_group failed: %s", e)
        self._groups = []

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("CheckpointManager is closed")

    # -- collectives (no-ops in a world of one) -------------------------------------------
    def _agree_any(self, flag: bool) -> bool:
        if not self._distributed:
            return flag
        flags: list[Any] = [None] * self.world_size
        dist.all_gather_object(flags, flag, group=self._ctl_group)
        return any(flags)

    def _first_error(self, error: str) -> str:
        gathered = self._gather(error)
        return next((e for e in gathered if e), "")

    def _gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, on every rank (writer thread, save group)."""
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._save_group)
        return out

    def _broadcast(self, obj: Any, group: Any = None) -> Any:
        """Rank 0's obj on every rank; on the save group (writer thread) unless `group`."""
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group or self._save_group)
        return box[0]

    def _emit(self, event: Event) -> None:
        if self.rank != 0 or self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a broken callback must not fail the save
            log.exception("on_event callback failed")
