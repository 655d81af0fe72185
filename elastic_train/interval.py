"""The adaptive checkpoint interval: Young/Daly's optimum, in steps.

With checkpoint cost C seconds and mean time between interruptions M seconds, the interval that
minimises expected lost time plus checkpoint overhead is about sqrt(2*C*M) (Young 1974; Daly 2006
for the higher-order terms, which matter only when C is not much smaller than M). It is turned
into steps with the measured step time and kept within [min_steps, max_steps].

C is the stall a save costs the step loop plus its time to commit, because work done after a
save began is lost until that save commits.

What it answers before it has seen enough:

| interruptions seen | cost C known | answer                                             |
| ------------------ | ------------ | -------------------------------------------------- |
| none, no prior     | any          | max_steps                                          |
| none, prior M0     | no           | min_steps (interruptions are expected: learn C)    |
| none, prior M0     | yes          | sqrt(2*C*M0), bounded                              |
| some               | no           | min_steps (save soon, and so learn C)              |
| some               | yes          | sqrt(2*C*M), M = (exposure + M0) / (n + [M0 set])  |

With a prior M0 it counts as one pseudo-interruption after M0 seconds, so early estimates are
not swung by one unlucky minute. Exposure is wall time from the first observation to now.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class AdaptiveInterval:
    """Fed observations, answers `next_interval_steps()`. Never raises on odd observations:
    negative, NaN or infinite values (and zero durations) are ignored. `state_dict()` is plain
    JSON-able data; keep it with the run's checkpoints and hand it back through
    `load_state_dict()` after a restart.

    Interruptions are deduplicated: times within `dedupe_s` of one already recorded are the same
    interruption, so a restarted trainer may feed the whole history again.

    Thread-safe: checkpoint costs typically arrive from the upload thread's commit callback while
    the step loop feeds step times and asks for the interval.
    """

    VERSION = 1

    def __init__(self, min_steps: int, max_steps: int, prior_mtbi_s: float | None = None,
                 window: int = 50, dedupe_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps ({min_steps}) <= max_steps ({max_steps})")
        if prior_mtbi_s is not None and not prior_mtbi_s > 0:
            raise ValueError(f"prior_mtbi_s={prior_mtbi_s} must be > 0")
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.prior_mtbi_s = prior_mtbi_s
        self.dedupe_s = dedupe_s
        self.clock = clock
        # Medians of recent values: the first step after a restart and an occasional slow
        # upload are outliers that should not move the interval.
        self._step_times: deque[float] = deque(maxlen=window)
        self._costs: deque[float] = deque(maxlen=max(5, window // 5))
        self._interruptions: list[float] = []
        self._since: float | None = None
        self._lock = threading.RLock()

    @staticmethod
    def _ok(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0

    def _touch(self, t: float | None = None) -> None:
        t = self.clock() if t is None else t
        if self._since is None or t < self._since:
            self._since = t

    def observe_step_time(self, seconds: float) -> None:
        """Seconds one optimizer step took (compute, not checkpoint stalls)."""
        if self._ok(seconds) and seconds > 0:
            with self._lock:
                self._touch()
                self._step_times.append(float(seconds))

    def observe_checkpoint_cost(self, stall_s: float, commit_s: float = 0.0) -> None:
        """One committed save: the step loop's stall plus the time from save to commit."""
        if self._ok(stall_s) and self._ok(commit_s) and stall_s + commit_s > 0:
            with self._lock:
                self._touch()
                self._costs.append(float(stall_s) + float(commit_s))

    def observe_interruption(self, t: float | None = None) -> bool:
        """An interruption (a restart that lost uncommitted work) at unix time `t` (default now).
        Returns False when it is a duplicate of one already recorded."""
        t = self.clock() if t is None else float(t)
        if not math.isfinite(t):
            return False
        with self._lock:
            if any(abs(t - u) <= self.dedupe_s for u in self._interruptions):
                return False
            self._touch(t)
            self._interruptions.append(t)
            self._interruptions.sort()
            return True

    def start_at(self, t: float) -> None:
        """The run began at unix time `t` (exposure counts from here). Optional."""
        if math.isfinite(t):
            with self._lock:
                self._touch(t)

    @property
    def step_time_s(self) -> float | None:
        with self._lock:
            return statistics.median(self._step_times) if self._step_times else None

    @property
    def checkpoint_cost_s(self) -> float | None:
        with self._lock:
            return statistics.median(self._costs) if self._costs else None

    @property
    def interruptions(self) -> int:
        return len(self._interruptions)

    def mtbi_s(self, now: float | None = None) -> float | None:
        """Estimated mean time between interruptions, or None with neither data nor prior."""
        now = self.clock() if now is None else now
        n = len(self._interruptions)
        exposure = max(0.0, now - self._since) if self._since is not None else 0.0
        if self.prior_mtbi_s is not None:
            return (exposure + self.prior_mtbi_s) / (n + 1)
        if n == 0:
            return None
        return max(exposure, 1e-9) / n

    def interval_s(self, now: float | None = None) -> float | None:
        """sqrt(2*C*M) in seconds, or None when C or M is unknown."""
        m, c = self.mtbi_s(now), self.checkpoint_cost_s
        if m is None or c is None:
            return None
        return math.sqrt(2.0 * c * m)

    def next_interval_steps(self, now: float | None = None) -> int:
        """Steps from one save to the next (see the module's table)."""
        m = self.mtbi_s(now)
        if m is None:
            return self.max_steps
        step = self.step_time_s
        if self.checkpoint_cost_s is None or step is None:
            # Interruptions are expected (seen, or a prior says so): save soon, and so learn C.
            expected = self._interruptions or self.prior_mtbi_s is not None
            return self.min_steps if expected else self.max_steps
        seconds = self.interval_s(now) or 0.0
        return max(self.min_steps, min(self.max_steps, round(seconds / step)))

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
            "prior_mtbi_s": self.prior_mtbi_s,
            "step_times": list(self._step_times),
            "costs": list(self._costs),
            "interruptions": list(self._interruptions),
            "since": self._since,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back observations from `state_dict()`. Bounds and prior stay as configured now
        (the config may have changed since); observations are merged, not replaced."""
        for x in state.get("step_times", []):
            self.observe_step_time(x)
        for x in state.get("costs", []):
            self.observe_checkpoint_cost(x)
        for t in state.get("interruptions", []):
            self.observe_interruption(t)
        since = state.get("since")
        if isinstance(since, (int, float)):
            self.start_at(since)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], **overrides: Any) -> AdaptiveInterval:
        kwargs: dict[str, Any] = {k: state[k] for k in ("min_steps", "max_steps", "prior_mtbi_s")
                                  if k in state}
        kwargs.update(overrides)
        obj = cls(**kwargs)
        obj.load_state_dict(state)
        return obj
