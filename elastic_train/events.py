"""The vocabulary of a run's metrics: every kind of event line a worker writes, in one place.

Everything that reads metrics (the goodput ledger, the chaos harness, its invariants and report)
matches these names instead of spelling them. The shape of each line is
`elastic_train/schemas/metrics.schema.json` (one branch per member; `elastic_train.metrics.
validate_record` checks a line against it)."""

from __future__ import annotations

from enum import Enum

from checkpointing import events as checkpoint_events


class Event(str, Enum):
    """The `"event"` of a metrics line (a step line has none: it has `"step"` and `"loss"`)."""

    START = "start"
    """A worker (re)started: `world_size`, `restored_step`, `restart`, `startup_s`."""
    COMMIT = checkpoint_events.COMMIT
    """A checkpoint committed (from the checkpoint manager)."""
    SAVE_FAILED = checkpoint_events.SAVE_FAILED
    """A save failed; the previous commit stays the newest."""
    FALLBACK = checkpoint_events.FALLBACK
    """A load found a committed checkpoint damaged and fell back to the one before."""
    DATA_CHANGED = "data_changed"
    """A resume changed the data order, as `checkpoint.allow_data_change` allowed: `step`,
    `changed` ({key: {"checkpoint": old, "now": new}})."""
    NOTICE = "notice"
    """All ranks agreed on a preemption notice: `step`, `deadline_s`, `source`."""
    LEFT = "left"
    """This node saved after its notice and leaves the job: `step`."""
    DONE = "done"
    """The run reached its final step and committed it: `step`."""

    def __str__(self) -> str:
        return self.value
