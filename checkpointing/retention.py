"""Garbage collection: keep the newest K committed steps, remove debris of failed saves.

Rules: never delete the only (or the newest) commit; delete a committed step's COMMIT.json before
its files, so a half-deleted step is debris and never a damaged commit; remove an uncommitted
directory only when a newer commit exists (an uncommitted step newer than every commit may be a save
still in flight). A failed delete raises `StorageError`; whatever was removed before stays removed
and the next GC finishes the job.
"""

from __future__ import annotations

from checkpointing.commit import COMMIT_FILE, list_steps, step_dir
from checkpointing.storage import Storage


def collect_garbage(storage: Storage, keep: int) -> list[str]:
    """Apply the rules above; returns the URLs of removed files."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    listing = list_steps(storage)
    if not listing.committed:
        return []
    newest = listing.committed[-1].step
    removed: list[str] = []
    for info in listing.committed[:-keep]:
        removed += storage.remove([f"{step_dir(info.step)}/{COMMIT_FILE}"])
        removed += storage.remove_tree(step_dir(info.step))
    for step in listing.partial:
        if step < newest:
            removed += storage.remove_tree(step_dir(step))
    return removed
