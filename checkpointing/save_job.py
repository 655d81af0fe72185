"""One save, from the host copy of the state to its outcome on every rank.

The caller's thread builds a `SaveJob` (`SaveJob.stage`: the only part that blocks training) and
hands it to a `SaveWriter`, whose writer thread runs the phases below. Every rank runs the same
collectives whatever failed in its own phases, so no rank waits in a collective its peers
skipped; a collective that itself fails (a peer died, or timed out) fails the save on this rank.

0. Deferred state (still the live tensors): DCP serialises this rank's files and `.metadata`
   into memory straight from them (a collective on the save group). That one pass is the host
   copy the optimizer's fence waits for; no separate staging copy is made first, so each byte is
   touched once fewer while training runs beside the save, and storage is not touched yet.
1. Rank 0 claims the writer epoch on its first save (`fence.py`), checks it is still the newest
   writer, and clears what an earlier attempt at this step left; every rank learns the first
   failure.
2. DCP writes every rank's files and rank 0's `.metadata` (a collective on the save group); for
   deferred state, the files serialised in phase 0 are checksummed and uploaded from the
   serialisation buffers themselves.
3. Rank 0 gathers every rank's outcome and file records and writes COMMIT.json (with its epoch),
   unless a rank failed, the job's deadline has passed (`SaveJob.may_commit`) or a newer writer
   has claimed the run (`Fenced`).
4. Every rank learns rank 0's outcome. After a commit, rank 0 applies retention if it is still the
   newest writer (a failure there is logged, never fails the save) and each rank prunes its
   node-local cache.

After a crash at any point, readers see what `commit.py` says: the previous commit stays newest
until COMMIT.json of this step is whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from checkpointing.cache import LocalCache
from checkpointing.collectives import Failure, RankGroup
from checkpointing.commit import (
    COMMIT_FILE,
    CommitInfo,
    FileRecord,
    new_commit,
    step_dir,
    verify_step,
    write_commit,
)
from checkpointing.config import CheckpointConfig
from checkpointing.dcp_io import RecordingWriter, _UploadingFileSystem
from checkpointing.errors import CorruptCheckpoint, SaveAborted
from checkpointing.fence import check_epoch, claim_epoch
from checkpointing.retention import collect_garbage
from checkpointing.staging import HostStager
from checkpointing.state import ModelOptimizerState
from checkpointing.storage import Storage

log = logging.getLogger(__name__)

FILE_BYTES = 32 * 2**20
"""A rank's shard is split into files of at least this size (`files_per_rank`):
each file is a request of its own, which pays on a large shard and only adds requests (and time
to a save and a restore) on a small one."""
MIN_FILES = 2
"""But never fewer files than this (unless `write_threads` is smaller): two small requests in
flight cost what one does, and a shard of two files is what the checkpoint's fault tests
inject into (a failure on the second file of a rank)."""


class SerializeFirstWriter(RecordingWriter):
    """A `RecordingWriter` for state that is still live: `dcp.save` only serialises, every file
    into memory (DCP's thread reads the live tensors) and `.metadata` too; nothing reaches
    storage until `upload_all()`, which checksums and uploads them, a thread a file, and raises
    the first upload's failure. So the live state is no longer read once `dcp.save` returns, and
    storage may be slow or down meanwhile without holding training up."""

    @staticmethod
    def _filesystem(storage: Storage, tee: Storage | None, files: int) -> _UploadingFileSystem:
        return _UploadLater(storage, tee, files)

    def upload_all(self) -> None:
        cast(_UploadLater, self.fs).upload_all()


class _UploadLater(_UploadingFileSystem):
    """Keeps each file DCP writes (and `.metadata`) in memory until `upload_all`. The bytes are
    the serialisation buffer itself (`BytesIO.getvalue` shares it), not a copy."""

    def __init__(self, storage: Storage, tee: Storage | None, upload_threads: int) -> None:
        super().__init__(storage, tee, upload_threads)
        self.pending: list[tuple[str, bytes]] = []
        self.metadata: bytes | None = None

    def file_written(self, name: str, data: bytes) -> None:
        with self._lock:
            self.pending.append((name, data))

    def upload_metadata(self, data: bytes) -> None:
        self.metadata = data

    def upload_all(self) -> None:
        """Upload every kept file, data files first and `.metadata` last (size, CRC and cache as
        `RecordingWriter`), dropping each once written. Raises the first upload's failure."""
        with self._lock:
            pending, self.pending = self.pending, []
        for name, data in pending:
            super().file_written(name, data)
        del pending
        failure = self.wait_uploads()
        if failure is not None:
            raise failure
        if self.metadata is not None:
            metadata, self.metadata = self.metadata, None
            super().upload_metadata(metadata)


class SaveJob:
    """One save: staged state plus the outcome, shared between the caller and the writer thread.

    `done` is set once the outcome is final on this rank: `failure` is None if the step
    committed. `staging_done` is set once the job no longer reads live state.
    """

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
        self.failure: Failure | None = None
        self.lock = threading.Lock()
        self.aborted = False  # set at the deadline (save_within); checked before COMMIT.json
        self.committing = False
        self.thread: threading.Thread | None = None

    @classmethod
    def stage(cls, step: int, state: Mapping[str, Any], stager: HostStager, defer: bool,
              started: float, deadline: float | None) -> SaveJob:
        """Copy `state` to host memory, except (`defer`) the `ModelOptimizerState` values that
        have an optimizer: the writer thread copies those, and their optimizer's next step()
        must wait for it (`staging_done`). Raises ValueError for a negative step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        live = {key: value.state_dict() if isinstance(value, Stateful) else value
                for key, value in state.items()}
        deferred = [key for key, value in state.items() if defer
                    and isinstance(value, ModelOptimizerState) and value.optimizer is not None]
        staged = {key: value if key in deferred else stager.stage(value, key)
                  for key, value in live.items()}
        return cls(step, staged, started, time.monotonic() - started, deadline, deferred)

    @property
    def ok(self) -> bool:
        """True once the step committed."""
        return self.done.is_set() and self.failure is None

    def may_commit(self) -> bool:
        """Rank 0 calls this right before writing COMMIT.json: the last point to abort."""
        with self.lock:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.aborted = True
            if self.aborted:
                return False
            self.committing = True
            return True

    def abort_unless_committing(self) -> bool:
        """At the caller's deadline: abort unless COMMIT.json is already being written. Returns
        True if the job is aborted (it will not commit)."""
        with self.lock:
            if not self.committing:
                self.aborted = True
            return self.aborted


class SaveWriter:
    """Runs the phases of each `SaveJob` of one manager on a writer thread of its own.

    `report(job)` is called on the writer thread once the outcome is final on this rank, before
    retention and before `job.done` is set; it must not raise.
    """

    def __init__(self, storage: Storage, config: CheckpointConfig, ranks: RankGroup,
                 stager: HostStager, cache: LocalCache | None, config_digest: str,
                 report: Callable[[SaveJob], None]) -> None:
        self.storage = storage
        self.config = config
        self.ranks = ranks
        self.stager = stager
        self.cache = cache
        self.config_digest = config_digest
        self.report = report
        self.epoch: int | None = None
        """Rank 0's writer epoch, claimed by `claim_epoch` (or lazily by the first save)."""

    def claim_epoch(self) -> int:
        """Rank 0: become the newest writer of the run (once). Raises StorageError."""
        if self.epoch is None:
            self.epoch = claim_epoch(self.storage)
        return self.epoch

    def check_epoch(self, action: str) -> None:
        """Rank 0: raise Fenced unless this writer is still the newest."""
        check_epoch(self.storage, self.claim_epoch(), action)

    def start(self, job: SaveJob) -> None:
        """Run `job` on a new daemon thread (the caller must join it before exiting)."""
        job.thread = threading.Thread(target=self._run, args=(job,),
                                      name=f"ckpt-save-{job.step}", daemon=True)
        job.thread.start()

    def _run(self, job: SaveJob) -> None:
        """The writer thread's body: whatever happens, the job ends committed or failed."""
        try:
            self._conclude(job, self._run_phases(job))
        except BaseException as e:  # noqa: BLE001 - e.g. a collective timed out: a peer died
            job.staging_done.set()
            if not job.done.is_set():
                self._conclude(job, Failure.of(e, self.storage.redact))

    def _run_phases(self, job: SaveJob) -> Failure | None:
        """Phases 0 to 3 (module docstring); returns rank 0's outcome, on every rank."""
        failure: Failure | None = None
        records: dict[str, FileRecord] = {}
        tee = self.cache.step_storage(job.step) if self.cache is not None else None
        target = self.storage.child(step_dir(job.step))
        files = files_per_rank(self.config.write_threads, self.storage.is_local,
                               _tensor_bytes(job.staged))
        early: SerializeFirstWriter | None = None
        if job.deferred:
            # Serialise from the live tensors first: after this the fence lets training go on.
            early = SerializeFirstWriter(target, files, tee=tee)
            try:
                failure = self._dcp_save(job, early)
            finally:
                job.staging_done.set()
        if self.ranks.rank == 0 and failure is None:
            failure = self._attempt(lambda: self._clear_step(job.step))
        failure = self.ranks.first_failure(failure)
        if failure is None:
            if early is not None:
                failure = self._attempt(early.upload_all)
                if failure is not None:  # as DCP names the rank of a failure it reports
                    failure = Failure(failure.kind, f"rank {self.ranks.rank}: {failure.message}")
                records = early.records
            else:
                writer = RecordingWriter(target, files, tee=tee)
                failure = self._dcp_save(job, writer)
                records = writer.records
        job.staged = None  # the stager keeps the buffers; drop our reference early
        gathered = self.ranks.gather((failure, records))
        if self.ranks.rank == 0:
            failure = next((f for f, _ in gathered if f is not None), None)
            if failure is None:
                files = {name: rec for _, recs in gathered for name, rec in recs.items()}
                info = new_commit(job.step, self.ranks.world_size, self.config_digest, files,
                                  writer_epoch=self.claim_epoch())
                if job.may_commit():
                    failure = self._attempt(lambda: self._commit(info))
                else:
                    failure = Failure(SaveAborted, "deadline passed before commit")
        return self.ranks.broadcast(failure)

    def _conclude(self, job: SaveJob, failure: Failure | None) -> None:
        """Phase 4: record the outcome, report it, tidy up after a commit, release waiters."""
        job.failure = failure
        self.report(job)
        if failure is None:
            if self.ranks.rank == 0:
                retention = self._attempt(lambda: self._collect_garbage())
                if retention is not None:
                    log.warning("retention failed: %s", retention.describe())
            if self.cache is not None:
                self.cache.prune(job.step)
        job.done.set()

    def _commit(self, info: CommitInfo) -> None:
        """Write COMMIT.json if this writer is still the newest and every file it lists is
        there with its size (one listing: a GC or an operator may have removed a step being
        filled; a COMMIT.json must never list a file that is gone)."""
        self.check_epoch(f"commit step {info.step}")
        present = verify_step(self.storage, info, deep=False)
        if not present.ok:
            raise CorruptCheckpoint(f"not committing: {present.detail}")
        write_commit(self.storage, info)

    def _collect_garbage(self) -> None:
        self.check_epoch("collect garbage")
        collect_garbage(self.storage, self.config.keep)

    def _dcp_save(self, job: SaveJob, writer: RecordingWriter) -> Failure | None:
        return self._attempt(lambda: dcp.save(
            job.staged, storage_writer=writer, process_group=self.ranks.group,
            no_dist=not self.ranks.distributed))

    def _clear_step(self, step: int) -> None:
        """Remove what an earlier attempt at `step` left (COMMIT.json first, see commit.py).
        Nothing there, the usual case, costs one listing and deletes nothing, so it needs no
        fence check."""
        found = self.storage.list_files(step_dir(step))
        if not found:
            return
        self.check_epoch(f"clear step {step}")
        if COMMIT_FILE in found:
            self.storage.remove([f"{step_dir(step)}/{COMMIT_FILE}"])
        self.storage.remove(f"{step_dir(step)}/{name}" for name in sorted(found)
                            if name != COMMIT_FILE)

    def _attempt(self, fn: Callable[[], Any]) -> Failure | None:
        """Run fn; return None, or what it raised as a (redacted, one-line) Failure.

        Catches BaseException on purpose: DCP's CheckpointException derives from it. A
        KeyboardInterrupt or SystemExit in this thread is still reported as a failure.
        """
        try:
            fn()
            return None
        except BaseException as e:  # noqa: BLE001
            return Failure.of(e, self.storage.redact)


def files_per_rank(write_threads: int | None, is_local: bool, shard_bytes: int) -> int:
    """How many files (each uploaded by a thread of its own once serialised) a rank's shard of
    `shard_bytes` is split into: files of at least FILE_BYTES, never fewer than MIN_FILES, at
    most `write_threads` (unset: 8 on an object store, 2 on a filesystem; CheckpointConfig)."""
    most = write_threads or (2 if is_local else 8)
    return min(most, max(MIN_FILES, -(-shard_bytes // FILE_BYTES)))


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict; a DTensor counts this rank's shard."""
    if isinstance(state, DTensor):
        state = state.to_local()
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0
