"""The manager's own process groups, the few collectives it runs on them, and typed failures
that cross ranks.

A `RankGroup` is one gloo group of every rank. The manager makes two: one for its writer thread
(DCP's save, the gather of file records, the broadcast of the outcome) and one for the caller's
thread (agreeing to skip a save, broadcasting what to load, DCP's load), so that two threads
never interleave collectives on one group. In a world of one (no initialised process group)
every collective returns this rank's own value.

An error crosses ranks as a `Failure`: the `CheckpointError` class to raise and a one-line,
redacted message. Every rank raises the same class with the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from checkpointing.errors import (
    CheckpointError,
    CorruptCheckpoint,
    Fenced,
    NoSuchCheckpoint,
    SaveAborted,
    StorageError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

KINDS: tuple[type[CheckpointError], ...] = (NoSuchCheckpoint, CorruptCheckpoint, StorageError,
                                             SaveAborted, Fenced)
"""The error classes that keep their type across ranks; any other error crosses as
`CheckpointError` (its class name stays in the message)."""


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


@dataclass(frozen=True)
class Failure:
    """What failed on one rank, in a form every rank can raise (picklable, no traceback)."""

    kind: type[CheckpointError]
    """One of `KINDS`, or `CheckpointError`."""
    message: str
    """One line, credentials already redacted."""

    @classmethod
    def of(cls, error: BaseException, redact: Callable[[str], str]) -> Failure:
        """`error` as a Failure, its message redacted with `redact`. A class of `KINDS` keeps its
        type and message; anything else (DCP's CheckpointException, an OSError, a timed-out
        collective) becomes a `CheckpointError` whose message is `describe_error`'s line."""
        kind = next((k for k in KINDS if isinstance(error, k)), CheckpointError)
        text = str(error) if kind is not CheckpointError else describe_error(error)
        return cls(kind, redact(" ".join(text.split())[:1000]))

    def describe(self) -> str:
        """One line for logs and `save_failed` events: the class name, then the message."""
        if self.kind is CheckpointError:
            return self.message  # describe_error's line: it names the original class
        return f"{self.kind.__name__}: {self.message}"

    def error(self) -> CheckpointError:
        """A new exception of `kind` with `message`, to raise."""
        return self.kind(self.message)


class RankGroup:
    """One gloo process group over every rank, used by one thread at a time.

    Must be constructed on every rank in the same order (it creates a process group when one is
    initialised). Each collective blocks until every rank has entered it, for at most
    `timeout_s`; after that (a dead peer) it raises on the ranks still waiting.
    """

    def __init__(self, timeout_s: float) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.group: Any = None
        if self.distributed:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others' are ignored)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank."""
        return any(self.gather(flag))

    def first_failure(self, failure: Failure | None) -> Failure | None:
        """The failure of the lowest rank that has one, on every rank (None if none has)."""
        return next((f for f in self.gather(failure) if f is not None), None)

    def on_rank_zero(self, fn: Callable[[], T], redact: Callable[[str], str]) -> T:
        """Run `fn` on rank 0 only and return its result on every rank.

        If it raises a `CheckpointError`, every rank raises one of the same class with the same
        message (rank 0 its original). Anything else it raises propagates on rank 0 only, and the
        other ranks then fail in their next collective with rank 0.
        """
        result: Any = None
        error: CheckpointError | None = None
        failure: Failure | None = None
        if self.rank == 0:
            try:
                result = fn()
            except CheckpointError as e:
                error, failure = e, Failure.of(e, redact)
        result, failure = self.broadcast((result, failure))
        if error is not None:
            raise error
        if failure is not None:
            raise failure.error()
        return result

    def close(self) -> None:
        """Destroy the process group; never raises (cleanup must go on). Safe to call twice."""
        group, self.group = self.group, None
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log.debug("destroy_process_group failed: %s", e)
