"""Asynchronous sharded checkpoints to object storage with an atomic commit.

Knows nothing of models or data.

`CheckpointManager` saves and loads any `Stateful` objects under a run URI (s3://, gs://, file://
or a local path); `ModelOptimizerState` wraps a model and its optimizer. See docs/internals.md.
"""

from checkpointing.commit import CommitInfo, VerifyReport
from checkpointing.config import CheckpointConfig
from checkpointing.errors import (
    CheckpointError,
    CorruptCheckpoint,
    NoSuchCheckpoint,
    SaveAborted,
    SaveFailed,
    StorageError,
)
from checkpointing.manager import CheckpointManager
from checkpointing.state import ModelOptimizerState

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "CommitInfo",
    "CorruptCheckpoint",
    "ModelOptimizerState",
    "NoSuchCheckpoint",
    "SaveAborted",
    "SaveFailed",
    "StorageError",
    "VerifyReport",
]
