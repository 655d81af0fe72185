"""The exceptions `checkpointing` raises. All derive from `CheckpointError` (an `Exception`)."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error this package raises on purpose."""


class StorageError(CheckpointError):
    """A storage operation still failed after retrying for the whole retry budget."""


class SaveFailed(CheckpointError):
    """A save did not commit (with `on_failure="stop"`, raised by `wait()` and the next `save()`).

    The previous committed checkpoint is untouched; the failed step has no COMMIT.json.
    """

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"checkpoint save of step {step} failed: {reason}")
        self.step = step
        self.reason = reason


class SaveAborted(CheckpointError):
    """A `save_within` deadline passed before the step's COMMIT.json was written: the step stays
    uncommitted (its files are debris for GC). `save_within` returns False instead of raising it;
    it is counted in `metrics["aborted"]` and reported as a `save_failed` event."""


class NoSuchCheckpoint(CheckpointError):
    """A step was asked for that has no COMMIT.json under the URI."""


class CorruptCheckpoint(CheckpointError):
    """A committed step's files do not match what its COMMIT.json records."""


class Fenced(CheckpointError):
    """A newer writer generation claimed the run (`fence.py`): this one may neither commit nor
    delete. Its saves fail; the newer writer's checkpoints are untouched."""
