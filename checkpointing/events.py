"""The events a `CheckpointManager` reports through `on_event` (rank 0 only, from any thread).

Each is a dict with `"event"` set to one of these names; the worker writes them to its metrics
as they are (`elastic_train.events` lists them beside the worker's own)."""

COMMIT = "commit"
"""`step`, `stall_s` (time the training thread spent in save), `commit_s` (save to commit)."""
SAVE_FAILED = "save_failed"
"""`step`, `error` (one line, credentials redacted)."""
FALLBACK = "fallback"
"""A load found committed `step` damaged and loaded the commit before instead: `step`, `to_step`
(None if no older commit was left), `file` (the bad file's URL), `reason` (one line)."""
