"""The commit protocol: a step exists for readers exactly when its COMMIT.json does.

A save of step S writes, in this order:

1. every rank's DCP data files into `{uri}/step_{S:08d}/` (`__{rank}_{i}.distcp`);
2. DCP's `.metadata` (rank 0, after gathering every rank's write results, i.e. after every
   rank's data upload returned);
3. `COMMIT.json` (rank 0, only after step 2 returned, and only while it is still the newest
   writer of the run: `fence.py`): step, world size, time, config digest, the writer's epoch and
   every file with its size, CRC-32 and the CRC-32 of each `CRC_CHUNK_BYTES` chunk. It is a
   single PUT (object stores) or an fsync'd rename (local disks), so it is either absent or
   whole.

What a reader may assume after a crash (a killed writer, a lost node, a storage outage) at each
point:

- during 1 or 2, or between 2 and 3: `step_S/` holds some files but no COMMIT.json. Readers ignore
  it; `latest_step()` is still the previous commit, which is untouched. GC removes `step_S/` once
  a newer step commits (never earlier: it may be a save still in flight).
- during 3: the PUT either happened or not; a torn COMMIT.json cannot be seen. A COMMIT.json that
  does not parse is treated as absent anyway.
- after 3: step S is committed; its files are the ones listed, with the listed sizes and CRCs
  (`verify_step` checks; a load checks every byte it reads and, if a file was damaged since,
  falls back to the commit before). Retention deletes COMMIT.json *first* when it removes a
  step, so a half-deleted step is debris, never a damaged commit.

Nothing here reads or writes tensors; it only names, lists and checks files.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from checkpointing.errors import CorruptCheckpoint, NoSuchCheckpoint
from checkpointing.storage import Storage

try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a platform without an ISA-L wheel: the same CRC, slower
    from zlib import crc32 as _crc32

COMMIT_FILE = "COMMIT.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_dir(step: int) -> str:
    """`step_00000040` for step 40."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


CRC_CHUNK_BYTES = 4 * 2**20
"""COMMIT.json keeps a CRC-32 of every aligned chunk of this many bytes as well as of the whole
file, so a reader that needs only part of a file (a load at another world size) can still check
every byte it reads."""


def crc32_of(data: bytes | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 (that of S3's ChecksumCRC32 too), from ISA-L where installed: every saved and
    loaded byte passes through here, and ISA-L's carry-less-multiply CRC costs several times less
    CPU than zlib's, beside training that wants the cores. Both release the GIL."""
    return _crc32(data, value) & 0xFFFFFFFF


def _times(matrix: Sequence[int], vector: int) -> int:
    """A 32x32 matrix over GF(2) (one int per column) times a 32-bit vector."""
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _shift_operator(length: int) -> list[int]:
    """The matrix that turns the CRC-32 of A into that of A followed by `length` zero bytes
    (zlib's crc32_combine, which Python's zlib does not expose)."""
    op = [0xEDB88320, *(1 << n for n in range(31))]  # one zero bit
    result = [1 << n for n in range(32)]  # identity
    bits = length * 8
    while bits:
        if bits & 1:
            result = [_times(op, col) for col in result]
        op = [_times(op, col) for col in op]
        bits >>= 1
    return result


@functools.cache
def _chunk_shift() -> list[int]:
    return _shift_operator(CRC_CHUNK_BYTES)


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32 of A followed by B, from the CRC-32s of each and B's length: the whole file's
    CRC from its chunks' without a second pass over the bytes."""
    shift = _chunk_shift() if length_b == CRC_CHUNK_BYTES else _shift_operator(length_b)
    return _times(shift, crc_a) ^ crc_b


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: int
    chunks: tuple[int, ...] = ()
    """CRC-32 of each `CRC_CHUNK_BYTES` chunk, in order (empty in older commits)."""

    @classmethod
    def of(cls, data: bytes | memoryview) -> FileRecord:
        view = memoryview(data)
        chunks = tuple(crc32_of(view[lo:lo + CRC_CHUNK_BYTES])
                       for lo in range(0, len(view), CRC_CHUNK_BYTES))
        whole = chunks[0] if chunks else crc32_of(b"")
        for index in range(1, len(chunks)):  # one pass over the bytes, not two
            lo = index * CRC_CHUNK_BYTES
            whole = crc32_combine(whole, chunks[index], min(CRC_CHUNK_BYTES, len(view) - lo))
        return cls(len(view), whole, chunks)

    def check(self, name: str, data: bytes | memoryview, start: int = 0) -> None:
        """Raise CorruptCheckpoint naming `name` unless `data`, read from offset `start`, matches
        the record: the whole file (start 0, all of it) or whole chunks (`start` a multiple of
        `CRC_CHUNK_BYTES`, ending on a chunk border or at the end of the file)."""
        view = memoryview(data)
        if start == 0 and len(view) == self.size:
            crc = crc32_of(view)
            if crc != self.crc32:
                raise CorruptCheckpoint(f"{name}: crc32 {crc:08x} != recorded {self.crc32:08x}")
            return
        if not self.chunks or start % CRC_CHUNK_BYTES:
            raise CorruptCheckpoint(f"{name}: no chunk checksums for bytes {start}+{len(view)}")
        for lo in range(0, len(view), CRC_CHUNK_BYTES):
            index = (start + lo) // CRC_CHUNK_BYTES
            crc = crc32_of(view[lo:lo + CRC_CHUNK_BYTES])
            if index >= len(self.chunks) or crc != self.chunks[index]:
                raise CorruptCheckpoint(f"{name}: chunk {index} (bytes {start + lo}+) has crc32 "
                                        f"{crc:08x}, not the recorded one")


@dataclass(frozen=True)
class CommitInfo:
    """What COMMIT.json says about one committed step. Holds no credentials or endpoints."""

    step: int
    world_size: int
    time: float
    config_digest: str
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    writer_epoch: int = 0
    """The writer generation that committed it (`fence.py`); 0 in commits made before fencing."""

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.files.values())

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = {name: {"size": rec.size, "crc32": rec.crc32, "chunks": list(rec.chunks)}
                         for name, rec in sorted(self.files.items())}
        body["total_bytes"] = self.total_bytes
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CommitInfo:
        """Raises ValueError for anything that is not a whole, well-formed COMMIT.json."""
        try:
            body = json.loads(text)
            files = {str(n): FileRecord(int(r["size"]), int(r["crc32"]),
                                        tuple(int(c) for c in r.get("chunks", ())))
                     for n, r in body["files"].items()}
            return cls(step=int(body["step"]), world_size=int(body["world_size"]),
                       time=float(body["time"]), config_digest=str(body["config_digest"]),
                       files=files, format=int(body.get("format", FORMAT_VERSION)),
                       writer_epoch=int(body.get("writer_epoch", 0)))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed {COMMIT_FILE}: {e}") from e

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "world_size": self.world_size, "time": self.time,
                "config_digest": self.config_digest, "files": len(self.files),
                "total_bytes": self.total_bytes, "writer_epoch": self.writer_epoch}


def new_commit(step: int, world_size: int, config_digest: str,
               files: Mapping[str, FileRecord], writer_epoch: int = 0) -> CommitInfo:
    return CommitInfo(step=step, world_size=world_size, time=time.time(),
                      config_digest=config_digest, files=dict(files), writer_epoch=writer_epoch)


def write_commit(storage: Storage, info: CommitInfo) -> None:
    """Step 3 of a save. Must be called only after every listed file is durable."""
    storage.write_bytes(f"{step_dir(info.step)}/{COMMIT_FILE}", info.to_json().encode())


def read_commit(storage: Storage, step: int) -> CommitInfo | None:
    """The step's commit, or None if it has none (or an unreadable one: not committed)."""
    try:
        raw = storage.read_bytes(f"{step_dir(step)}/{COMMIT_FILE}")
    except FileNotFoundError:
        return None
    try:
        info = CommitInfo.from_json(raw)
    except ValueError:
        return None
    return info if info.step == step else None


@dataclass
class Listing:
    committed: list[CommitInfo]
    """Committed steps, oldest first."""
    partial: list[int]
    """Step directories without a (valid) COMMIT.json: in flight, or debris of a failed save."""


LIST_READ_THREADS = 8
"""COMMIT.json files `list_steps` reads at once: each is a request, and a restore lists first."""


def list_steps(storage: Storage) -> Listing:
    """Every step directory, committed or not. Raises StorageError if storage fails."""
    steps = sorted(s for name in storage.list_dirs() if (s := parse_step_dir(name)) is not None)
    committed, partial = [], []
    with ThreadPoolExecutor(min(LIST_READ_THREADS, max(1, len(steps))),
                            thread_name_prefix="ckpt-list") as pool:
        infos = list(pool.map(lambda step: read_commit(storage, step), steps))
    for step, info in zip(steps, infos, strict=True):
        if info is None:
            partial.append(step)
        else:
            committed.append(info)
    return Listing(committed, partial)


def committed_info(storage: Storage, step: int | None = None) -> CommitInfo:
    """The commit of `step`, or the newest commit. Raises NoSuchCheckpoint naming the URI when
    that step (or any step) is not committed."""
    if step is None:
        committed = list_steps(storage).committed
        if not committed:
            raise NoSuchCheckpoint(f"no committed step under {storage.url}")
        return committed[-1]
    info = read_commit(storage, step)
    if info is None:
        raise NoSuchCheckpoint(f"no committed step {step} under {storage.url}")
    return info


@dataclass
class VerifyReport:
    ok: bool
    step: int | None
    detail: str
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_step(storage: Storage, info: CommitInfo, deep: bool = True) -> VerifyReport:
    """Check every file COMMIT.json lists: present, same size, and (deep) same CRC-32."""
    base = step_dir(info.step)
    present = storage.list_files(base)
    problems = []
    for name, rec in sorted(info.files.items()):
        if name not in present:
            problems.append(f"{name}: missing")
        elif present[name] != rec.size:
            problems.append(f"{name}: size {present[name]} != recorded {rec.size}")
        elif deep:
            try:
                rec.check(name, storage.read_bytes(f"{base}/{name}"))
            except CorruptCheckpoint as e:
                problems.append(str(e))
    if problems:
        return VerifyReport(False, info.step, f"step {info.step}: {len(problems)} bad file(s): "
                            + "; ".join(problems[:5]), problems)
    how = "sizes and CRC-32" if deep else "sizes"
    return VerifyReport(True, info.step, f"step {info.step}: {len(info.files)} files, "
                        f"{info.total_bytes} bytes, {how} match")
