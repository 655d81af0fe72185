"""Copy committed checkpoints between URIs (another region or cloud), data first, COMMIT.json last.

Each file is checked against the source COMMIT.json (size, CRC-32) as it is read, so a corrupt
source is never propagated; the destination's old COMMIT.json for that step (if any, and different)
is deleted before any data is written, and the new one is written only after every file is; then
the destination is verified by reading it back. A copy interrupted at any point leaves the step
uncommitted at the destination, never half-committed.
"""

from __future__ import annotations

from dataclasses import dataclass

from checkpointing.commit import (
    COMMIT_FILE,
    CommitInfo,
    list_steps,
    read_commit,
    step_dir,
    verify_step,
    write_commit,
)
from checkpointing.errors import CorruptCheckpoint, NoSuchCheckpoint
from checkpointing.storage import Storage


@dataclass
class CopyResult:
    step: int
    copied_files: int
    copied_bytes: int
    skipped: bool


def copy_checkpoints(src: Storage, dst: Storage, step: int | None = None) -> list[CopyResult]:
    """Copy `step` (or every committed step) from src to dst.

    Raises NoSuchCheckpoint if `step` is not committed at src, CorruptCheckpoint if a source file
    does not match its commit or the destination does not verify, StorageError on storage faults.
    """
    if step is None:
        infos = list_steps(src).committed
    else:
        info = read_commit(src, step)
        if info is None:
            raise NoSuchCheckpoint(f"no committed step {step} under {src.url}")
        infos = [info]
    return [_copy_one(src, dst, info) for info in infos]


def _copy_one(src: Storage, dst: Storage, info: CommitInfo) -> CopyResult:
    base = step_dir(info.step)
    existing = read_commit(dst, info.step)
    if existing is not None and existing.files == info.files and \
            verify_step(dst, existing, deep=False).ok:
        return CopyResult(info.step, 0, 0, skipped=True)
    if existing is not None:
        dst.remove([f"{base}/{COMMIT_FILE}"])
    copied = 0
    for name, rec in sorted(info.files.items()):
        data = src.read_bytes(f"{base}/{name}")
        if len(data) != rec.size:
            raise CorruptCheckpoint(f"{src.url_of(base)}/{name}: {len(data)} bytes, COMMIT.json "
                                    f"records {rec.size}")
        rec.check(f"{src.url_of(base)}/{name}", data)
        dst.write_bytes(f"{base}/{name}", data)
        copied += len(data)
    write_commit(dst, info)
    report = verify_step(dst, info, deep=True)
    if not report.ok:
        dst.remove([f"{base}/{COMMIT_FILE}"])
        raise CorruptCheckpoint(f"copy to {dst.url_of(base)} did not verify: {report.detail}")
    return CopyResult(info.step, len(info.files), copied, skipped=False)
