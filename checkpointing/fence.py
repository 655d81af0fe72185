"""Fencing: only the newest writer generation of a run may commit or delete.

Each writer (rank 0 of each (re)started world, or any process that saves) claims an epoch when it
starts: it lists `{uri}/_writers/`, and creates `{epoch:012d}.json` one above the highest it saw,
exclusively (`Storage.create_exclusive`: two writers racing for one epoch cannot both win; the
loser takes the next). Before it clears a step, writes a COMMIT.json or deletes anything, a writer
checks that no higher epoch exists; if one does, it raises `Fenced` and does nothing. COMMIT.json
records the epoch.

What this guarantees: a writer that was superseded before its check can neither commit nor
delete. What it does not: the check and the write that follows are two requests, so a writer
superseded in between may still land that one write (a COMMIT.json of a step whose files it wrote
itself, or one delete of its own step's debris); it fails at its next check. Readers lose nothing
either way: a COMMIT.json is written only after every file it lists.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from checkpointing.errors import Fenced
from checkpointing.storage import Storage

log = logging.getLogger(__name__)

WRITERS_DIR = "_writers"
KEEP_EPOCH_FILES = 4
"""Epoch files kept; older ones only say who wrote long ago (the highest is all that counts)."""


def _epoch_of(name: str) -> int | None:
    stem = name.removesuffix(".json")
    return int(stem) if stem.isdigit() and name.endswith(".json") else None


def newest_epoch(storage: Storage) -> int:
    """The highest epoch claimed under the run (0 if none)."""
    epochs = [e for n in storage.list_files(WRITERS_DIR) if (e := _epoch_of(n)) is not None]
    return max(epochs, default=0)


def claim_epoch(storage: Storage, attempts: int = 20) -> int:
    """Become the newest writer of the run; returns the epoch claimed. Raises StorageError if
    storage fails, or Fenced after `attempts` lost races (writers starting in a loop)."""
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "token": uuid.uuid4().hex, "time": time.time()}).encode()
    for _ in range(attempts):
        epoch = newest_epoch(storage) + 1
        rel = f"{WRITERS_DIR}/{epoch:012d}.json"
        try:
            storage.create_exclusive(rel, owner)
        except FileExistsError:
            try:
                if storage.read_bytes(rel) == owner:
                    break  # our own write, whose reply was lost and retried
            except FileNotFoundError:
                pass
            continue
        break
    else:
        raise Fenced(f"{storage.url}: could not claim a writer epoch in {attempts} attempts")
    _forget_old(storage, epoch)
    return epoch


def check_epoch(storage: Storage, epoch: int, action: str) -> None:
    """Raise Fenced, naming `action`, if a writer newer than `epoch` has claimed the run."""
    newest = newest_epoch(storage)
    if newest > epoch:
        raise Fenced(f"{storage.url}: writer epoch {epoch} was superseded by epoch {newest} "
                     f"(another job writes this run); refusing to {action}")


def _forget_old(storage: Storage, epoch: int) -> None:
    old = sorted(e for n in storage.list_files(WRITERS_DIR)
                 if (e := _epoch_of(n)) is not None and e <= epoch - KEEP_EPOCH_FILES)
    try:
        storage.remove(f"{WRITERS_DIR}/{e:012d}.json" for e in old)
    except Exception as e:  # noqa: BLE001 - old epoch files are harmless; the next claim retries
        log.debug("could not remove old writer epochs: %s", type(e).__name__)
