"""Asynchronous sharded checkpoints to object storage with an atomic commit.

Knows nothing of models or data.

`CheckpointManager` saves and loads any `Stateful` objects under a run URI (s3://, gs://, file://
or a local path); `ModelOptimizerState` wraps a model and its optimizer. See docs/internals.md.
"""

from checkpointing.commit import CommitInfo, VerifyReport
from checkpointing.errors import (
    CheckpointError,
    CorruptCheckpoint,
    NoSuchCheckpoint,
    SaveFailed,
    StorageError,
)
from checkpointing.manager import CheckpointManager, CheckpointSettings
from checkpointing.state import ModelOptimizerState

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSettings",
    "CommitInfo",
    "CorruptCheckpoint",
    "ModelOptimizerState",
    "NoSuchCheckpoint",
    "SaveFailed",
    "StorageError",
    "VerifyReport",
]
