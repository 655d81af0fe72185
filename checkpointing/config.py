"""`CheckpointConfig`: how a `CheckpointManager` saves and loads, declared once.

An application that has its own config file composes this dataclass as its checkpoint section
(a subclass may add keys of its own, e.g. when to save; the manager ignores them). Fields marked
`TUNING` change how fast a save or load runs, never what it keeps: an application may leave them
out of its file, and they then keep these defaults.

Where to write (the URI) and how to reach it (`storage_options`: endpoint, credentials) are not
settings: they are arguments of `CheckpointManager`, so that a config can be printed, logged and
compared without leaking credentials.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

TUNING: dict[str, Any] = {"tuning": True}
"""Field metadata of the settings that tune speed only (threads, staging, collective timeout)."""


def is_tuning(f: dataclasses.Field[Any]) -> bool:
    """True for a field marked `TUNING`."""
    return bool(f.metadata.get("tuning"))


@dataclass
class CheckpointConfig:
    """How the manager saves. Constructing one with an impossible value raises ValueError with one
    line naming the field, the value and what is expected (see `validate`)."""

    keep: int = 3
    """Committed checkpoints kept after each commit (>= 1); older ones are garbage-collected.
    The only commit is never deleted."""
    mode: Literal["async", "sync"] = "async"
    """async: `save` returns once a host copy is staged and uploads in the background;
    sync: `save` returns once the step is committed (or failed)."""
    when_busy: Literal["wait", "skip"] = "wait"
    """When a save is due while the previous one is still uploading: wait for it, or skip this
    one (all ranks agree)."""
    on_failure: Literal["continue", "stop"] = "continue"
    """After a save fails for good (retries exhausted): keep going (counted and reported), or
    raise `SaveFailed` from the next `wait()` or `save()` on every rank."""
    cache_dir: str = ""
    """Node-local copy of the newest checkpoint, read on restart when it matches the remote
    commit. Empty: no cache."""
    retry_timeout_s: float = 60.0
    """Total time one storage operation (a file upload, a ranged read, a listing) may spend
    retrying transient errors before it fails for good."""
    staging: Literal["deferred", "blocking"] = field(default="deferred", metadata=TUNING)
    """deferred: for `ModelOptimizerState` values of an async save, `save` returns at once and the
    writer thread copies them to host memory; their optimizer's next `step()` waits until that
    copy is done (a step pre-hook), so the copy overlaps forward and backward. Anything else that
    mutates the saved tensors before then must call `maybe_wait_for_staging()` first.
    blocking: `save` copies everything before it returns."""
    write_threads: int | None = field(default=None, metadata=TUNING)
    """The most files each rank's shard is split into (>= 1; how many below that:
    `save_job.files_per_rank`). One thread serialises them in turn; each is uploaded on a thread
    of its own as soon as it is whole. None: 8 on an object store, where each is a request in
    flight and they add up; 2 on a local or shared filesystem, where a write is a copy into the
    page cache that more threads only make compete with training (docs/benchmarks.md)."""
    read_threads: int = field(default=8, metadata=TUNING)
    """Ranged reads in flight per rank during a load (>= 1)."""
    collective_timeout_s: float = field(default=600.0, metadata=TUNING)
    """Timeout of the manager's own gloo groups: how long a rank waits for a dead peer mid-save
    before that save fails on this rank (> 0)."""

    def __post_init__(self) -> None:
        self.validate(prefix=f"{type(self).__name__}.")

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError for the first impossible value, in one line: `{prefix}{field}=value`
        and what is expected. Subclasses that add fields extend this."""
        checks = [(isinstance(self.keep, int) and self.keep >= 1, "keep", "must be >= 1"),
                  (self.retry_timeout_s >= 0, "retry_timeout_s", "must be >= 0"),
                  (self.write_threads is None or self.write_threads >= 1, "write_threads",
                   "must be >= 1 (or unset)"),
                  (self.read_threads >= 1, "read_threads", "must be >= 1"),
                  (self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0")]
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is Literal:
                allowed = typing.get_args(hints[f.name])
                checks.append((getattr(self, f.name) in allowed, f.name,
                               "must be one of " + ", ".join(map(repr, allowed))))
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{prefix}{name}={getattr(self, name)!r} {expected}")
