"""Rank 0's side of saving before a node joins (the agents' side is
`elastic_train.node.rendezvous`; the keys are in `elastic_train.node.contract`)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from elastic_train.node import contract


class JoinRequests:
    """Rank 0's side of saving before a node joins: says it listens, learns (from a polling
    thread) that an agent asked, and tells the agents when the save has committed.

    On failure it stays out of the way: if the store cannot be reached, `from_env` returns None
    and the agents re-form at once; if the save never commits, they re-form after their
    `save_before_join_s`."""

    POLL_S = 0.1
    REFORM_GRACE_S = 1.5
    """How long rank 0 waits, after the save for a joining node committed, for the agents to
    re-form: their monitor interval (0.5 s on the cloud) and the stop of the workers."""
    HOLD_MAX_S = 4.0
    """The longest rank 0 holds the world for a join in all; below the step timer's 8 s floor, so
    the ranks waiting for rank 0 in the next step's all-reduce never count as hung."""

    def __init__(self, endpoint: str, key: str) -> None:
        from torch.distributed import TCPStore

        host, _, port = endpoint.rpartition(":")
        self.key = key
        self._store = TCPStore(host, int(port), is_master=False,
                               timeout=timedelta(seconds=10), wait_for_workers=False)
        self._asked = threading.Event()
        self._stop = threading.Event()
        self._save_step: int | None = None
        self._committed = threading.Event()
        self._store.set(f"{key}/{contract.LISTENING}", "1")
        self._poller = threading.Thread(target=self._poll, name="join-requests", daemon=True)
        self._poller.start()

    @classmethod
    def from_env(cls) -> JoinRequests | None:
        if (found := contract.world_store()) is None:
            return None
        endpoint, key = found
        try:
            return cls(endpoint, key)
        except (RuntimeError, ValueError, OSError) as e:
            print(f"elastic-train: warning: rendezvous store {endpoint} unreachable ({e}); a "
                  "joining node will cost the steps since the last checkpoint", flush=True)
            return None

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                if self._store.check([f"{self.key}/{contract.ASKED}"]):
                    self._asked.set()
                    return
            except RuntimeError:
                return

    def wait_asked(self, timeout_s: float) -> bool:
        """Block until an agent has asked (True) or `timeout_s` passed (False)."""
        return self._asked.wait(timeout_s)

    def save_now(self, step: int) -> bool:
        """True once, at the first step after a node asked to join: save this step."""
        if self._save_step is None and self._asked.is_set():
            self._save_step = step
            return True
        return False

    def on_commit(self, step: int) -> None:
        """A checkpoint of `step` committed: if it covers the requested save, let the node in."""
        if self._save_step is not None and step >= self._save_step:
            try:
                self._store.set(f"{self.key}/{contract.SAVED}", str(step))
            except RuntimeError:
                pass  # the agents re-form after their save_before_join_s anyway
            self._committed.set()

    def hold(self, step: int, grace_s: float = REFORM_GRACE_S,
             most_s: float = HOLD_MAX_S) -> bool:
        """After starting the save of `step`: if it is the save a joining node asked for, block
        until it has committed and `grace_s` more have passed, at most `most_s` in all. The
        agents re-form meanwhile, which stops this process; any step trained in that time
        would be discarded (the grown world restores this save), so waiting loses nothing. If
        no re-form comes (the joining node went away, the save failed), training goes on.
        Returns whether the save committed within the hold; False at once for any other step."""
        if self._save_step != step:
            return False
        start = time.monotonic()
        committed = self._committed.wait(most_s)
        if committed:
            self._stop.wait(max(0.0, min(grace_s, most_s - (time.monotonic() - start))))
        return committed

    def close(self) -> None:
        self._stop.set()
