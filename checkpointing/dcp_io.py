"""DCP storage writer and reader on top of `storage.Storage`.

Writer: DCP serialises each rank's shard into a few files; we buffer each file in memory and upload
it with one retried, whole-object write (so a transient fault repeats the upload, never leaves half
a file), recording its size and CRC-32 for COMMIT.json. `.metadata` is written straight to its final
name: our COMMIT.json, not DCP's tmp-then-rename, is what makes a step exist.

Reader — why DCP's stock `FsspecReader` loads far slower than a plain read of the same bytes
(figures: docs/benchmarks.md): it opens each file as one buffered stream and, item by item,
`torch.load`s a view of it. `torch.load` reads a zip archive (central directory at the end, then
the data), so each item seeks forward and back; the buffered stream refetches blocks on those
seeks and every request waits for the previous one. We instead compute the byte ranges the load
plan needs, merge neighbours, split them into chunks, fetch the chunks in parallel with whole
ranged reads (each retried), and then deserialise from memory.

Verification: the reader knows every file's size and CRC-32s from COMMIT.json. Before reading a
file it checks the file's size (one listing per step); it widens the ranges it needs to whole
`CRC_CHUNK_BYTES` chunks and checks each chunk's CRC as it arrives, so every byte handed to DCP
is a byte that was committed. A mismatch raises `CorruptCheckpoint` naming the file (not retried:
another read returns the same bytes). A file from the node-local cache that does not match is read
again from the remote store instead.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import pickle
import posixpath
import threading
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpointing.commit import CRC_CHUNK_BYTES, FileRecord
from checkpointing.errors import CorruptCheckpoint
from checkpointing.storage import Storage

log = logging.getLogger(__name__)
T = TypeVar("T")

METADATA_FILE = ".metadata"
READ_CHUNK_BYTES = 16 * 2**20
"""Ranged reads are at most this long; smaller chunks mean more requests in parallel."""
MERGE_GAP_BYTES = 1 * 2**20
"""Two needed ranges closer than this are fetched as one (the gap costs less than a request)."""


class _KeepOpenBuffer(io.BytesIO):
    """DCP closes the stream before leaving `create_stream`; we still need the bytes then."""

    def close(self) -> None:
        pass

    def release(self) -> None:
        super().close()


@contextmanager
def _without_zip_crc() -> Generator[None, None, None]:
    """While DCP serialises items into a file: torch.save without the CRC-32 of every record of
    its zip archives.

    That CRC is one more pass over every byte saved, taken inside torch.save (about half its time
    for a large tensor), and redundant here: each file's own CRCs are computed as it is uploaded,
    recorded in COMMIT.json and checked on every load; torch.load does not need it. torch keeps
    the setting per thread (a ContextVar): this changes it for the thread writing the file, for
    as long as it writes it."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _UploadingFileSystem(_FsspecFileSystem):
    """DCP's filesystem seam: each file DCP writes is buffered whole and handed to an upload
    thread as soon as it is serialised (`file_written`), so the first upload overlaps the
    serialisation of the next file; `wait_uploads` waits for all of them."""

    def __init__(self, storage: Storage, tee: Storage | None, upload_threads: int = 1) -> None:
        super().__init__()
        self.fs = storage.fs
        self.storage = storage
        self.tee = tee
        self.upload_threads = max(1, upload_threads)
        self.records: dict[str, FileRecord] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[Any] = []

    def upload(self, name: str, data: bytes) -> None:
        """Write one whole file (retried) with its CRC-32, which the store checks where it can;
        remember its size and CRCs; copy it to the cache."""
        record = FileRecord.of(data)
        try:
            self.storage.write_bytes(name, data, crc32=record.crc32)
        except BaseException as e:
            # Upload threads have no caller to raise to: remember it for wait_uploads.
            with self._lock:
                self.errors.append(e)
            raise
        with self._lock:
            self.records[name] = record
        if self.tee is not None:
            try:
                self.tee.write_bytes(name, data)
            except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a failure
                log.warning("could not cache %s: %s", name, type(e).__name__)

    def file_written(self, name: str, data: bytes) -> None:
        """DCP finished serialising `name`: upload it on an upload thread."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.upload_threads,
                                                thread_name_prefix="ckpt-upload")
            self._uploads.append(self._pool.submit(self.upload, name, data))

    def wait_uploads(self) -> BaseException | None:
        """Wait for every upload handed on so far; return the first failure of any."""
        with self._lock:
            uploads, self._uploads = self._uploads, []
            pool, self._pool = self._pool, None
        for future in uploads:
            future.exception()  # recorded in self.errors by upload()
        if pool is not None:
            pool.shutdown()
        return self.errors[0] if self.errors else None

    def upload_metadata(self, data: bytes) -> None:
        """Write `.metadata`, DCP's last file (after every rank's data files)."""
        self.upload(METADATA_FILE, data)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "r" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        buffer = _KeepOpenBuffer()
        with _without_zip_crc():
            yield buffer
        # Only reached when DCP finished writing the file without an error. getvalue() shares
        # the buffer's bytes (no copy) once nothing more is written to it.
        self.file_written(posixpath.basename(os.fspath(path)), buffer.getvalue())
        buffer.release()

    def mkdir(self, path: str | os.PathLike) -> None:
        if self.storage.is_local:
            os.makedirs(self.storage.root, exist_ok=True)

    def exists(self, path: str | os.PathLike) -> bool:
        # DCP asks whether `.metadata` exists (prepare_local_plan) only to warn before it
        # overwrites; the save clears the step directory itself (save_job.py). Answering
        # from storage would be a request per rank per save, and, in the serialise-first
        # save, a storage access (retried through an outage) while training waits on it.
        return False


class RecordingWriter(FsspecWriter):
    """A DCP StorageWriter for one step directory that splits this rank's shard into `files`
    files. One thread serialises them, one after another, into memory, and each is uploaded on a
    thread of its own as soon as it is whole: the uploads overlap the serialisation, and
    serialising threads would only compete for the GIL and memory bandwidth. After `dcp.save`,
    `records` lists the files this rank wrote (name -> size, CRC). Upload failures raise
    `StorageError` out of `dcp.save` (wrapped by DCP in its `CheckpointException`)."""

    def __init__(self, storage: Storage, files: int = 2, tee: Storage | None = None):
        super().__init__(storage.url, single_file_per_rank=True, sync_files=False,
                         thread_count=files, overwrite=True, **storage.storage_options)
        self.fs = self._filesystem(storage, tee, files)

    @staticmethod
    def _filesystem(storage: Storage, tee: Storage | None, files: int) -> _UploadingFileSystem:
        return _UploadingFileSystem(storage, tee, files)

    @property
    def records(self) -> dict[str, FileRecord]:
        return dict(cast(_UploadingFileSystem, self.fs).records)

    def _write_data(self, planner: SavePlanner, file_queue: Any) -> Future[list[WriteResult]]:
        # DCP split the plan into `thread_count` files (write_data); serialise them on one
        # thread (DCP's own GPU-to-host copy-ahead applies to a single thread only).
        files, self.thread_count = self.thread_count, 1
        try:
            return super()._write_data(planner, file_queue)
        finally:
            self.thread_count = files

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """DCP's write, then every upload awaited and a check that every item was written."""
        try:
            future = super().write_data(plan, planner)
        finally:  # also when serialising failed: no upload outlives the save
            failure = cast(_UploadingFileSystem, self.fs).wait_uploads()
        if failure is not None:
            raise failure
        results = future.wait()
        if len(results) != len(plan.items):
            raise RuntimeError(f"DCP wrote {len(results)} of {len(plan.items)} items")
        return future

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        # As DCP's, but written once to the final name (see the module docstring).
        metadata.version = CURRENT_DCP_VERSION
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        cast(_UploadingFileSystem, self.fs).upload_metadata(pickle.dumps(metadata))


class ParallelReader(FsspecReader):
    """A DCP StorageReader that fetches the needed byte ranges in parallel and checks them against
    `records` (COMMIT.json's files) as they arrive (module docstring).

    `sources` may send some files to another Storage (the node-local cache); the rest come from
    `storage`. Every read is retried as a whole; a failure raises `StorageError`, a file that does
    not match its record (or that COMMIT.json does not list) `CorruptCheckpoint`, out of
    `dcp.load` (inside DCP's CheckpointException) or out of `read_metadata`.
    """

    def __init__(self, storage: Storage, records: Mapping[str, FileRecord],
                 sources: Mapping[str, Storage] | None = None, threads: int = 8) -> None:
        super().__init__(storage.url, **storage.storage_options)
        self.storage = storage
        self.records = dict(records)
        self.sources = dict(sources or {})
        self.threads = threads
        self.bytes_read = 0
        self._metadata: Metadata | None = None
        self._sizes: dict[str, int] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata, read and checked once (DCP and the manager both ask for it)."""
        if self._metadata is None:
            metadata = pickle.loads(self._read_whole(METADATA_FILE))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _record(self, name: str) -> FileRecord:
        record = self.records.get(name)
        if record is None:
            raise CorruptCheckpoint(f"{self.storage.url_of(name)}: not listed in COMMIT.json")
        return record

    def _checked_source(self, name: str) -> Storage:
        """Where to read `name` from, after checking its size there (the cache if it holds the
        committed size, else the remote store, which must)."""
        record = self._record(name)
        cached = self.sources.get(name)
        if cached is not None:
            if cached.list_files().get(name) == record.size:
                return cached
            self.sources.pop(name)
        if self._sizes is None:
            self._sizes = self.storage.list_files()
        size = self._sizes.get(name)
        if size != record.size:
            found = "missing" if size is None else f"{size} bytes"
            raise CorruptCheckpoint(f"{self.storage.url_of(name)}: {found}, COMMIT.json "
                                    f"records {record.size}")
        return self.storage

    def _read_whole(self, name: str) -> bytes:
        record = self._record(name)

        def read(source: Storage) -> bytes:
            data = source.read_bytes(name)
            record.check(self.storage.url_of(name), data)
            return data

        return self._checked_read(name, read)

    def _checked_read(self, name: str, read: Callable[[Storage], T]) -> T:
        """`read(source)` from where `name` is (`_checked_source`); if the cached copy fails its
        check (CorruptCheckpoint), once more from the remote store, whose failure is final."""
        source = self._checked_source(name)
        try:
            return read(source)
        except CorruptCheckpoint:
            if source is self.storage:
                raise
        self._drop_cached(name)
        return read(self._checked_source(name))

    def _drop_cached(self, name: str) -> None:
        log.warning("cached %s does not match COMMIT.json; reading it from %s", name,
                    self.storage.url)
        self.sources.pop(name, None)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            per_file.setdefault(name, []).append(item)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-read") as pool:
            # One file at a time bounds memory to the largest file's needed bytes.
            for name, items in sorted(per_file.items()):
                infos = [self.storage_data[i.storage_index] for i in items]
                if any(getattr(info, "transform_descriptors", None) for info in infos):
                    raise NotImplementedError(f"{name}: stream transforms are not supported")
                record = self._record(name)
                spans = _merge_ranges([_chunk_aligned(info.offset, info.offset + info.length,
                                                      record) for info in infos])
                chunks = self._fetch(pool, name, spans)
                for item, info in zip(items, infos, strict=True):
                    self._deliver(item, chunks.view(info.offset, info.length), planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _fetch(self, pool: ThreadPoolExecutor, name: str, spans: list[tuple[int, int]]
               ) -> _Chunks:
        """The bytes of `spans` of `name`, each chunk checked against its CRC; a cached file
        that fails the check is fetched again from the remote store."""
        record = self._record(name)
        shown = self.storage.url_of(name)
        jobs = [(lo, min(lo + READ_CHUNK_BYTES, end))
                for start, end in spans for lo in range(start, end, READ_CHUNK_BYTES)]

        def read(source: Storage) -> _Chunks:
            chunks: dict[int, bytes] = {}

            def fetch(job: tuple[int, int]) -> int:
                lo, hi = job
                data = source.read_bytes(name, lo, hi)
                if record.chunks:
                    record.check(shown, data, lo)
                chunks[lo] = data
                return len(data)

            self.bytes_read += sum(pool.map(fetch, jobs))
            if not record.chunks:  # an older commit: only a whole-file CRC (one span: the file)
                whole = b"".join(chunks[lo] for lo in sorted(chunks))
                record.check(shown, whole)
                chunks = {0: whole}
            return _Chunks(chunks)

        return self._checked_read(name, read)

    @staticmethod
    def _deliver(item: Any, view: memoryview, planner: LoadPlanner) -> None:
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(view))
            return
        tensor = cast(torch.Tensor, torch.load(_ViewStream(view), map_location="cpu",
                                               weights_only=True))
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise ValueError(f"{item.storage_index}: stored size {tuple(tensor.size())} "
                             f"!= expected {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)


class _ViewStream(io.RawIOBase):
    """A read-only stream over bytes we hold: torch.load reads each record straight from them
    into the tensor's storage (`readinto`), where `io.BytesIO(view)` would first copy them all."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        n = max(0, min(len(target), len(self._view) - self._position))
        target[:n] = self._view[self._position:self._position + n]
        self._position += n
        return n


class _Chunks:
    """A file's fetched byte ranges, kept as the chunks they arrived in rather than copied into
    one buffer (one pass over the bytes fewer): an item inside one chunk is a view of it; the
    few that straddle two chunks are joined."""

    def __init__(self, chunks: dict[int, bytes]) -> None:
        self.chunks = chunks
        self.starts = sorted(chunks)

    def view(self, offset: int, length: int) -> memoryview:
        """Bytes [offset, offset + length) of the file, which the fetched chunks cover."""
        i = bisect.bisect_right(self.starts, offset) - 1
        lo = self.starts[i]
        if offset + length <= lo + len(self.chunks[lo]):
            return memoryview(self.chunks[lo])[offset - lo:offset - lo + length]
        parts, position, end = [], offset, offset + length
        while position < end:  # chunks of one span are contiguous
            lo = self.starts[i]
            piece = memoryview(self.chunks[lo])[position - lo:end - lo]
            parts.append(piece)
            position += len(piece)
            i += 1
        return memoryview(b"".join(parts))


def _chunk_aligned(start: int, end: int, record: FileRecord) -> tuple[int, int]:
    """[start, end) widened to whole CRC chunks (the whole file if it has no chunk CRCs), so
    that every byte read can be checked."""
    if not record.chunks:
        return 0, record.size
    lo = start - start % CRC_CHUNK_BYTES
    hi = min(record.size, -(-end // CRC_CHUNK_BYTES) * CRC_CHUNK_BYTES)
    return lo, hi


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(set(ranges)):
        if merged and start <= merged[-1][1] + MERGE_GAP_BYTES:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]

