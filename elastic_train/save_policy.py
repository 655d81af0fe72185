"""The save policy: when the trainer saves, and by when a save must have committed.

One owner for the decision. Rank 0 alone wishes for a save (its interval, or a node waiting to
join); every rank may hold a preemption notice. Each step, every rank adds its `votes` to the
step's one all-reduce, and `decide` turns the sums into what all ranks then do:

- some rank has a notice: save this step within the agreed deadline (`agree_on_deadline`, one
  more collective, only then); the noticed node leaves afterwards;
- else rank 0 wants a save: save this step;
- else nothing.

Rank 0 asks its interval and the join requests in `votes`, so the trainer must call it just
before the all-reduce: a node that asked to join during the step gets a save of that step.

The policy is `Stateful`: rank 0's adaptive interval (what it learned about checkpoint cost and
interruptions) goes into every checkpoint under the key `policy` and comes back on restore. Other
ranks keep nothing there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from elastic_train.config import CheckpointConfig, NoticesConfig
from elastic_train.interval import AdaptiveInterval
from elastic_train.join_requests import JoinRequests
from elastic_train.metrics import say
from elastic_train.notices import Notice, NoticeWatcher, build_watcher


class Save(Enum):
    """What all ranks agreed to do at the end of a step."""

    NO = "no"
    """Nothing is due."""
    DUE = "due"
    """Rank 0's interval, or a node waiting to join, asks for a save of this step."""
    NOTICE = "notice"
    """Some node has a preemption notice: save this step within the agreed deadline."""


class SavePolicy(Stateful):
    """Decides when to save (see the module docstring). Build it with `build_save_policy`.

    `every`: save at multiples of this step (0: never) when `interval` is None; `interval`: rank
    0's adaptive interval, counted from the last save. The final step is never due: the trainer
    saves it itself. Never raises from `votes`, `decide` or `on_commit`; `agree_on_deadline` is a
    collective and raises as any collective does when a peer is gone.
    """

    def __init__(self, total_steps: int, notices: NoticeWatcher, *, every: int = 0,
                 interval: AdaptiveInterval | None = None,
                 join_requests: JoinRequests | None = None, is_main: bool = True,
                 device: torch.device | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.total_steps = total_steps
        self.every = every
        self.interval = interval
        self.notices = notices
        self.join_requests = join_requests
        self.is_main = is_main
        self.device = device or torch.device("cpu")
        self.clock = clock
        self.last_save_step = 0

    # -- the step loop ---------------------------------------------------------------------------
    def pending_notice(self) -> Notice | None:
        """This node's preemption notice, if any (a read of one attribute: call it every step)."""
        return self.notices.pending()

    def votes(self, step: int, notice: Notice | None) -> list[float]:
        """This rank's share of the step's all-reduce: [has a notice, wants a save of `step`].
        Must be called just before that all-reduce (see the module docstring)."""
        return [float(notice is not None), float(self.is_main and self._due(step))]

    @staticmethod
    def decide(summed: Sequence[float]) -> Save:
        """What every rank does, from the all-reduced `votes`."""
        if summed[0] > 0:
            return Save.NOTICE
        return Save.DUE if summed[1] > 0 else Save.NO

    def _due(self, step: int) -> bool:
        if step >= self.total_steps:
            return False
        if self.join_requests is not None and self.join_requests.save_now(step):
            return True
        if self.interval is not None:
            return step - self.last_save_step >= self.interval.next_interval_steps()
        return self.every > 0 and step % self.every == 0

    def agree_on_deadline(self, notice: Notice | None) -> float:
        """Seconds left before the earliest noticed node goes, the same on every rank (one
        collective: call it on every rank, only after `decide` said `Save.NOTICE`). At least 1:
        clouds are often late, so a deadline already past still gets a try."""
        left = notice.seconds_left(now=self.clock()) if notice is not None else math.inf
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([left], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            left = float(t.item())
        return max(1.0, left)

    def observe_step_time(self, seconds: float) -> None:
        """How long the step just done took (feeds the adaptive interval)."""
        if self.interval is not None:
            self.interval.observe_step_time(seconds)

    def record_save(self, step: int) -> None:
        """A save of `step` begins (whether or not it will commit): the interval counts from
        here. Call it before handing the state to the checkpointer."""
        self.last_save_step = step

    def hold_for_join(self, step: int) -> None:
        """Rank 0, right after starting the save of `step`: if a joining node asked for it,
        wait for the re-form instead of training steps it would discard
        (`JoinRequests.hold`). Returns at once otherwise, and on other ranks."""
        if self.join_requests is not None:
            self.join_requests.hold(step)

    def on_commit(self, step: int, stall_s: float, commit_s: float) -> None:
        """A checkpoint of `step` committed (rank 0, any thread): learn its cost, and let a node
        that asked to join in once the save it asked for is committed."""
        if self.join_requests is not None:
            self.join_requests.on_commit(step)
        if self.interval is not None:
            self.interval.observe_checkpoint_cost(stall_s, commit_s)

    def resume(self, restored_step: int | None, restarted: bool) -> None:
        """The step loop begins after `restored_step` (None: from scratch). A restore, or a
        restart of the worker group, means the run was interrupted: the adaptive interval counts
        one interruption now. What it knew comes from the restored checkpoint, so of several
        interruptions with no commit between them only the last is remembered."""
        self.last_save_step = restored_step or 0
        if self.interval is not None and (restored_step is not None or restarted):
            self.interval.observe_interruption(self.clock())

    # -- Stateful ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank 0: the adaptive interval's state as one JSON string (None with a fixed interval),
        so that a checkpoint loads whatever interval the next run is configured with. Other
        ranks: nothing (their values would compete with rank 0's for the same key)."""
        if not self.is_main:
            return {}
        return {"interval": None if self.interval is None
                else json.dumps(self.interval.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back rank 0's learned interval. An unreadable one is reported and ignored: the
        interval then starts without history."""
        text = state.get("interval")
        if self.interval is None or not text:
            return
        try:
            self.interval.load_state_dict(json.loads(text))
        except (ValueError, TypeError, AttributeError) as e:
            say(f"warning: the checkpoint's interval state is unreadable ({e}); adaptive "
                "interval starts without history")

    def close(self) -> None:
        """Stop the notice watcher and the join-request poller. Safe to call twice."""
        self.notices.close()
        if self.join_requests is not None:
            self.join_requests.close()


def build_save_policy(cfg: CheckpointConfig, notices: NoticesConfig, total_steps: int,
                      is_main: bool, device: torch.device) -> SavePolicy:
    """The policy a trainer worker wants: the notice watcher (`notices`) on every rank;
    on rank 0, the adaptive interval (when configured) and the join requests (when its agent runs
    the `c10d-fast` rendezvous). Raises ValueError for an unknown notice source."""
    interval = None
    if cfg.interval == "adaptive" and is_main:
        interval = AdaptiveInterval(cfg.min_every, cfg.max_every,
                                    prior_mtbi_s=cfg.prior_mtbi_s or None)
    # A node waiting to join makes torchrun restart every worker from the newest commit: rank 0
    # saves first when the agents ask (elastic_train.node.rendezvous).
    join_requests = JoinRequests.from_env() if is_main else None
    return SavePolicy(total_steps, build_watcher(notices), every=cfg.every, interval=interval,
                      join_requests=join_requests, is_main=is_main, device=device)
