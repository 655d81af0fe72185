"""Rank 0's side of saving before a node joins (the agents' side is
`elastic_train.node.rendezvous`; the keys are in `elastic_train.node.contract`)."""

from __future__ import annotations

import threading
from datetime import timedelta

from elastic_train.node import contract


class JoinRequests:
    """Rank 0's side of saving before a node joins: says it listens, learns (from a polling
    thread) that an agent asked, and tells the agents when the save has committed.

    On failure it stays out of the way: if the store cannot be reached, `from_env` returns None
    and the agents re-form at once; if the save never commits, they re-form after their
    `save_before_join_s`."""

    POLL_S = 0.1

    def __init__(self, endpoint: str, key: str) -> None:
        from torch.distributed import TCPStore

        host, _, port = endpoint.rpartition(":")
        self.key = key
        self._store = TCPStore(host, int(port), is_master=False,
                               timeout=timedelta(seconds=10), wait_for_workers=False)
        self._asked = threading.Event()
        self._stop = threading.Event()
        self._save_step: int | None = None
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

    def close(self) -> None:
        self._stop.set()
