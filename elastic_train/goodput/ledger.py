"""Where a run's time (and money) went, computed from its metrics records.

Buckets; together they add up to the wall time from the first line to the last:

- useful: step time of steps whose result survives (no later restart rolled them back).
- lost: step time of steps a later restart rolled back (they were, or will be, recomputed).
- checkpoint_stall: the step loop's `stall_s` of committed saves (from `commit` events).
- restart: from the last line of one incarnation to the next one's first step, up to
  `restart_allowance_s` per restart (detection, rendezvous, process start, checkpoint load).
- waiting_for_capacity: the part of such a gap beyond the allowance (no world could form: nodes
  being provisioned, torchrun waiting for `--nnodes` MIN). No node is billed for it.
- startup: a fresh start's time to its first step (data preparation, model build).
- other: what remains (logging, evaluation, an unexplained slow step).

How a step is timed: the time between consecutive step lines of one incarnation (so any pause
between steps is counted somewhere); a save's stall, when its `commit` event names the step
before, moves from the step into `checkpoint_stall`. The first step after a start takes its own
`step_time_s`. A step is lost when a later `start` restored an earlier step, or when the same
step number is logged again without one.

Cost: world size x seconds per bucket ("rank-seconds"), divided by `ranks_per_node`, at the spot
price; compared with the on-demand price of only the useful work and the startup.

This module only computes: it reads and writes nothing. `store` keeps ledger.json beside the
checkpoints; `report` prints and plots it.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from elastic_train.events import Event
from elastic_train.metrics import Record, is_step

Bucket = Literal["useful", "lost", "checkpoint_stall", "restart", "waiting_for_capacity",
                 "startup", "other"]
BUCKETS: tuple[Bucket, ...] = ("useful", "lost", "checkpoint_stall", "restart",
                               "waiting_for_capacity", "startup", "other")
BUCKET_LABELS: dict[Bucket, str] = {
    "useful": "useful steps",
    "lost": "recomputed (lost) steps",
    "checkpoint_stall": "checkpoint stall",
    "restart": "restart / rendezvous",
    "waiting_for_capacity": "waiting for capacity",
    "startup": "startup",
    "other": "other",
}
DEFAULT_RESTART_ALLOWANCE_S = 120.0
MAX_TIMELINE_POINTS = 2000
VERSION = 1
"""The `version` of the ledger document (`Ledger.to_dict`)."""

# Names that live in `store` and are still reached through this module (see `__getattr__`).


@dataclass
class Prices:
    """Per node-hour prices in USD. Zero means unknown: costs are then not reported."""

    spot_per_node_hour: float = 0.0
    on_demand_per_node_hour: float = 0.0
    ranks_per_node: int = 1
    """Trainer ranks (torchrun --nproc-per-node) on one billed node."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Prices:
        """From ELASTIC_TRAIN_SPOT_PRICE, ELASTIC_TRAIN_ON_DEMAND_PRICE (USD per node-hour) and
        LOCAL_WORLD_SIZE (ranks per node, set by torchrun). Unparsable values count as unset."""
        env = os.environ if env is None else env

        def num(key: str, default: float) -> float:
            try:
                value = float(env.get(key, default))
            except ValueError:
                return default
            return value if math.isfinite(value) and value >= 0 else default

        return cls(num("ELASTIC_TRAIN_SPOT_PRICE", 0.0), num("ELASTIC_TRAIN_ON_DEMAND_PRICE", 0.0),
                   max(1, int(num("LOCAL_WORLD_SIZE", 1))))


@dataclass(frozen=True)
class StepCounts:
    useful: int
    """Steps whose result stands (the last step of the lineage, once each)."""
    lost: int
    """Step lines whose result a later restart (or a redo) threw away."""


@dataclass(frozen=True)
class Incarnation:
    """One life of the run's processes: from a `start` (or the first line) to its last line."""

    start: float
    end: float
    world_size: int
    restored_step: int | None
    restart: int | None
    first_step: int | None
    last_step: int | None


@dataclass(frozen=True)
class Cost:
    """Node-hours per bucket and, where a price is known, what they cost in USD."""

    node_hours: float
    node_hours_by_bucket: dict[str, float]
    spot_usd: float | None = None
    faults_usd: float | None = None
    """Spot cost of the lost steps and the restarts."""
    on_demand_fault_free_usd: float | None = None
    """On-demand cost of only the useful steps and the startup."""
    spot_over_on_demand: float | None = None

    @classmethod
    def of(cls, rank_seconds: Mapping[str, float], prices: Prices) -> Cost:
        node_h = {k: v / prices.ranks_per_node / 3600.0 for k, v in rank_seconds.items()}
        billed = sum(node_h.values())
        spot = prices.spot_per_node_hour
        on_demand = prices.on_demand_per_node_hour
        spot_usd = billed * spot if spot > 0 else None
        fault_free = (node_h["useful"] + node_h["startup"]) * on_demand if on_demand > 0 else None
        return cls(
            node_hours=billed, node_hours_by_bucket=node_h, spot_usd=spot_usd,
            faults_usd=(node_h["lost"] + node_h["restart"]) * spot if spot > 0 else None,
            on_demand_fault_free_usd=fault_free,
            spot_over_on_demand=(spot_usd / fault_free
                                 if spot_usd is not None and fault_free else None))


@dataclass(frozen=True)
class Ledger:
    """A run's ledger (see the module docstring). `to_dict` is the ledger.json document."""

    version: int
    generated: float
    """Unix time it was computed."""
    state: Literal["done", "in progress"]
    first_time: float | None
    last_time: float | None
    wall_s: float
    last_step: int | None
    world_size: int | None
    """Of the last incarnation."""
    steps: StepCounts
    time_s: dict[str, float]
    """Seconds per bucket (keys: BUCKETS); they add up to `wall_s`."""
    rank_seconds: dict[str, float]
    """Seconds x world size per bucket (nobody is billed for waiting_for_capacity)."""
    goodput: float | None
    """Useful seconds / wall seconds; None for an empty run."""
    restarts: int
    notices: int
    commits: int
    save_failures: int
    interruptions: list[float]
    """Unix times of the last line before each restart."""
    incarnations: list[Incarnation]
    timeline: list[tuple[float, int, int]]
    """(time, step, world size) of step lines, thinned to about MAX_TIMELINE_POINTS."""
    restart_allowance_s: float
    prices: Prices
    cost: Cost

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: every field; `cost` without the prices not known."""
        doc = asdict(self)
        doc["timeline"] = [list(p) for p in self.timeline]
        doc["cost"] = {k: v for k, v in doc["cost"].items() if v is not None}
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Ledger:
        """The ledger of a `to_dict` document (e.g. a ledger.json read back). Raises ValueError
        naming what is missing or of the wrong shape."""
        try:
            return cls(
                **{k: doc[k] for k in ("version", "generated", "state", "first_time",
                                       "last_time", "wall_s", "last_step", "world_size",
                                       "time_s", "rank_seconds", "goodput", "restarts",
                                       "notices", "commits", "save_failures", "interruptions",
                                       "restart_allowance_s")},
                steps=StepCounts(**doc["steps"]),
                incarnations=[Incarnation(**i) for i in doc["incarnations"]],
                timeline=[(float(t), int(s), int(w)) for t, s, w in doc["timeline"]],
                prices=Prices(**doc["prices"]),
                cost=Cost(**doc["cost"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a ledger document ({type(e).__name__}: {e})") from e


@dataclass
class _Segment:
    """The records of one incarnation, as they are cut out of the metrics."""

    start: float | None = None
    world_size: int = 1
    restored_step: int | None = None
    restart: int | None = None
    explicit: bool = False  # began with a `start` event
    records: list[Record] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.records[-1]["time"]


def _split(records: Iterable[Record]) -> list[_Segment]:
    """Records in time order, cut at every `start` event."""
    segments: list[_Segment] = []
    for rec in sorted(records, key=lambda r: r["time"]):
        if rec.get("event") == Event.START:
            segments.append(_Segment(
                start=rec["time"], world_size=int(rec.get("world_size") or 1),
                restored_step=rec.get("restored_step"), restart=rec.get("restart"),
                explicit=True, records=[rec]))
            continue
        if not segments:
            segments.append(_Segment())
        seg = segments[-1]
        seg.records.append(rec)
        if is_step(rec) and not seg.explicit and seg.start is None:
            seg.start = rec["time"] - float(rec.get("step_time_s") or 0.0)
            seg.world_size = int(rec.get("world_size") or 1)
    return [s for s in segments if s.records]


def compute_ledger(records: Iterable[Record], prices: Prices | None = None,
                   restart_allowance_s: float = DEFAULT_RESTART_ALLOWANCE_S,
                   generated: float | None = None) -> Ledger:
    """The ledger of a run from its metrics records (see the module docstring), stamped
    `generated` (default: now). Never raises on odd records; an empty input gives an empty
    ledger."""
    prices = prices or Prices()
    segments = _split(records)
    seconds = dict.fromkeys(BUCKETS, 0.0)
    rank_s = dict.fromkeys(BUCKETS, 0.0)
    # Steps whose result currently stands, in step order: (step, seconds, world_size).
    standing: list[tuple[int, float, int]] = []
    lost_steps = 0
    seen: Counter[str] = Counter()
    restarts = 0
    interruptions: list[float] = []
    timeline: list[tuple[float, int, int]] = []
    summaries: list[Incarnation] = []
    done_step: int | None = None

    def add(bucket: Bucket, s: float, ws: int) -> None:
        s = max(0.0, s)
        seconds[bucket] += s
        rank_s[bucket] += s * ws

    def roll_back(to_step: int) -> None:
        nonlocal lost_steps
        while standing and standing[-1][0] > to_step:
            _, s, ws = standing.pop()
            lost_steps += 1
            add("lost", s, ws)

    prev: _Segment | None = None
    for seg in segments:
        ws = seg.world_size
        if prev is not None and seg.explicit:
            restarts += 1
            interruptions.append(prev.end)
            gap = max(0.0, (seg.start or prev.end) - prev.end)
            add("restart", min(gap, restart_allowance_s), ws)
            add("waiting_for_capacity", max(0.0, gap - restart_allowance_s), 0)
        if seg.explicit:
            roll_back(int(seg.restored_step or 0))
        stalls = {int(r["step"]): float(r.get("stall_s") or 0.0) for r in seg.records
                  if r.get("event") == Event.COMMIT and isinstance(r.get("step"), int)}
        seen.update(r["event"] for r in seg.records if isinstance(r.get("event"), str))
        for r in seg.records:
            if r.get("event") == Event.DONE and isinstance(r.get("step"), int):
                done_step = r["step"]
        steps = [r for r in seg.records if is_step(r) and isinstance(r["step"], int)]
        t0 = seg.start if seg.start is not None else seg.records[0]["time"]
        accounted_until = t0
        last_step: int | None = None
        for i, r in enumerate(steps):
            t, step = float(r["time"]), int(r["step"])
            if i == 0:
                compute = min(float(r.get("step_time_s") or 0.0), max(0.0, t - t0))
                resumed = seg.restored_step is not None or prev is not None
                add("restart" if resumed else "startup", t - compute - t0, ws)
            else:
                elapsed = t - accounted_until
                stall = min(stalls.get(last_step, 0.0) if last_step is not None else 0.0, elapsed)
                add("checkpoint_stall", stall, ws)
                compute = elapsed - stall
            accounted_until = t
            roll_back(step - 1)  # the same step again without a start: the old one was redone
            standing.append((step, max(0.0, compute), ws))
            last_step = step
            timeline.append((round(t, 3), step, ws))
        tail = seg.end - accounted_until
        if steps:
            stall = min(stalls.get(last_step, 0.0) if last_step is not None else 0.0, tail)
            add("checkpoint_stall", stall, ws)
            add("other", tail - stall, ws)
        else:  # started, then nothing: its whole life was restart (or startup) time
            add("restart" if prev is not None else "startup", tail, ws)
        summaries.append(Incarnation(
            start=t0, end=seg.end, world_size=ws, restored_step=seg.restored_step,
            restart=seg.restart, first_step=steps[0]["step"] if steps else None,
            last_step=last_step))
        prev = seg
    for _, s, ws in standing:
        add("useful", s, ws)

    first = summaries[0].start if summaries else None
    last = summaries[-1].end if summaries else None
    wall = (last - first) if first is not None and last is not None else 0.0
    finished = done_step is not None and bool(summaries) and summaries[-1].last_step == done_step
    return Ledger(
        version=VERSION,
        generated=time.time() if generated is None else generated,
        state="done" if finished else "in progress",
        first_time=first,
        last_time=last,
        wall_s=wall,
        last_step=standing[-1][0] if standing else None,
        world_size=summaries[-1].world_size if summaries else None,
        steps=StepCounts(useful=len(standing), lost=lost_steps),
        time_s=seconds,
        rank_seconds=rank_s,
        goodput=seconds["useful"] / wall if wall > 0 else None,
        restarts=restarts,
        notices=seen[Event.NOTICE],
        commits=seen[Event.COMMIT],
        save_failures=seen[Event.SAVE_FAILED],
        interruptions=interruptions,
        incarnations=summaries,
        timeline=_thin(timeline, MAX_TIMELINE_POINTS),
        restart_allowance_s=restart_allowance_s,
        prices=replace(prices),
        cost=Cost.of(rank_s, prices),
    )


def _thin(points: list[tuple[float, int, int]], most: int) -> list[tuple[float, int, int]]:
    """At most about `most` points: every k-th, keeping the last and every world-size change."""
    if len(points) <= most:
        return points
    k = math.ceil(len(points) / most)
    return [p for i, p in enumerate(points)
            if i % k == 0 or i == len(points) - 1 or p[2] != points[i - 1][2]]


def with_costs(ledger: Ledger, prices: Prices) -> Ledger:
    """`ledger` with its `prices` and `cost` (re)computed from its rank-seconds."""
    return replace(ledger, prices=replace(prices), cost=Cost.of(ledger.rank_seconds, prices))


def interruption_times(records: Iterable[Record]) -> list[float]:
    """Unix times of the run's interruptions (the last line before each restart), for
    `elastic_train.interval.AdaptiveInterval.observe_interruption`."""
    return compute_ledger(records).interruptions
