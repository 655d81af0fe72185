"""Where a run's time (and money) went, computed from its metrics.jsonl.

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
Reading a file that is still being written is fine: a torn last line is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
BUCKETS = ("useful", "lost", "checkpoint_stall", "restart", "waiting_for_capacity", "startup",
           "other")
BUCKET_LABELS = {
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


def read_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl; lines that do not parse (a torn last line) are
    skipped. Raises OSError when the file cannot be read."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("time"), (int, float)):
                records.append(rec)
    return records


@dataclass
class _Incarnation:
    start: float | None = None
    world_size: int = 1
    restored_step: int | None = None
    restart: int | None = None
    explicit: bool = False  # began with a `start` event
    records: list[dict[str, Any]] | None = None

    @property
    def end(self) -> float:
        assert self.records
        return self.records[-1]["time"]


def _split(records: Iterable[dict[str, Any]]) -> list[_Incarnation]:
    """Records in time order, cut at every `start` event."""
    incs: list[_Incarnation] = []
    for rec in sorted(records, key=lambda r: r["time"]):
        if rec.get("event") == "start":
            incs.append(_Incarnation(
                start=rec["time"], world_size=int(rec.get("world_size") or 1),
                restored_step=rec.get("restored_step"), restart=rec.get("restart"),
                explicit=True, records=[rec]))
            continue
        if not incs:
            incs.append(_Incarnation(records=[]))
        inc = incs[-1]
        assert inc.records is not None
        inc.records.append(rec)
        if "step" in rec and "event" not in rec and not inc.explicit and inc.start is None:
            inc.start = rec["time"] - float(rec.get("step_time_s") or 0.0)
            inc.world_size = int(rec.get("world_size") or 1)
    return [i for i in incs if i.records]


def compute_ledger(records: Iterable[dict[str, Any]], prices: Prices | None = None,
                   restart_allowance_s: float = DEFAULT_RESTART_ALLOWANCE_S) -> dict[str, Any]:
    """The ledger of a run from its metrics records (see the module docstring). Never raises on
    odd records; an empty input gives an empty ledger."""
    prices = prices or Prices()
    incs = _split(records)
    seconds = dict.fromkeys(BUCKETS, 0.0)
    rank_s = dict.fromkeys(BUCKETS, 0.0)
    # Steps whose result currently stands, in step order: (step, seconds, world_size).
    standing: list[tuple[int, float, int]] = []
    lost_steps = 0
    counts = {"restarts": 0, "notices": 0, "commits": 0, "save_failures": 0}
    interruptions: list[float] = []
    timeline: list[list[float]] = []
    summaries: list[dict[str, Any]] = []
    done_step: int | None = None

    def add(bucket: str, s: float, ws: int) -> None:
        s = max(0.0, s)
        seconds[bucket] += s
        rank_s[bucket] += s * ws

    def roll_back(to_step: int) -> None:
        nonlocal lost_steps
        while standing and standing[-1][0] > to_step:
            _, s, ws = standing.pop()
            lost_steps += 1
            add("lost", s, ws)

    prev: _Incarnation | None = None
    for inc in incs:
        assert inc.records is not None
        ws = inc.world_size
        if prev is not None and inc.explicit:
            counts["restarts"] += 1
            interruptions.append(prev.end)
            gap = max(0.0, (inc.start or prev.end) - prev.end)
            add("restart", min(gap, restart_allowance_s), ws)
            add("waiting_for_capacity", max(0.0, gap - restart_allowance_s), 0)
        if inc.explicit:
            roll_back(int(inc.restored_step or 0))
        stalls = {int(r["step"]): float(r.get("stall_s") or 0.0) for r in inc.records
                  if r.get("event") == "commit" and isinstance(r.get("step"), int)}
        counts["commits"] += sum(1 for r in inc.records if r.get("event") == "commit")
        counts["save_failures"] += sum(1 for r in inc.records if r.get("event") == "save_failed")
        counts["notices"] += sum(1 for r in inc.records if r.get("event") == "notice")
        for r in inc.records:
            if r.get("event") == "done" and isinstance(r.get("step"), int):
                done_step = r["step"]
        steps = [r for r in inc.records if "event" not in r and isinstance(r.get("step"), int)]
        t0 = inc.start if inc.start is not None else inc.records[0]["time"]
        accounted_until = t0
        last_step: int | None = None
        for i, r in enumerate(steps):
            t, step = float(r["time"]), int(r["step"])
            if i == 0:
                compute = min(float(r.get("step_time_s") or 0.0), max(0.0, t - t0))
                resumed = inc.restored_step is not None or prev is not None
                bucket = "restart" if resumed else "startup"
                add(bucket, t - compute - t0, ws)
            else:
                elapsed = t - accounted_until
                stall = min(stalls.get(last_step, 0.0) if last_step is not None else 0.0, elapsed)
                add("checkpoint_stall", stall, ws)
                compute = elapsed - stall
            accounted_until = t
            roll_back(step - 1)  # the same step again without a start: the old one was redone
            standing.append((step, max(0.0, compute), ws))
            last_step = step
            timeline.append([round(t, 3), step, ws])
        tail = inc.end - accounted_until
        if steps:
            stall = min(stalls.get(last_step, 0.0) if last_step is not None else 0.0, tail)
            add("checkpoint_stall", stall, ws)
            add("other", tail - stall, ws)
        else:  # started, then nothing: its whole life was restart (or startup) time
            add("restart" if prev is not None else "startup", tail, ws)
        summaries.append({
            "start": t0, "end": inc.end, "world_size": ws, "restored_step": inc.restored_step,
            "restart": inc.restart, "first_step": steps[0]["step"] if steps else None,
            "last_step": last_step,
        })
        prev = inc
    for _, s, ws in standing:
        add("useful", s, ws)

    first = summaries[0]["start"] if summaries else None
    last = summaries[-1]["end"] if summaries else None
    wall = (last - first) if summaries else 0.0
    ledger: dict[str, Any] = {
        "version": 1,
        "generated": time.time(),
        "state": "done" if done_step is not None and summaries and
                 summaries[-1]["last_step"] == done_step else "in progress",
        "first_time": first,
        "last_time": last,
        "wall_s": wall,
        "last_step": standing[-1][0] if standing else None,
        "world_size": summaries[-1]["world_size"] if summaries else None,
        "steps": {"useful": len(standing), "lost": lost_steps},
        "time_s": seconds,
        "rank_seconds": rank_s,
        "goodput": seconds["useful"] / wall if wall > 0 else None,
        **counts,
        "interruptions": interruptions,
        "incarnations": summaries,
        "timeline": _thin(timeline, MAX_TIMELINE_POINTS),
        "restart_allowance_s": restart_allowance_s,
    }
    return with_costs(ledger, prices)


def _thin(points: list[list[float]], most: int) -> list[list[float]]:
    """At most about `most` points: every k-th, keeping the last and every world-size change."""
    if len(points) <= most:
        return points
    k = math.ceil(len(points) / most)
    return [p for i, p in enumerate(points)
            if i % k == 0 or i == len(points) - 1 or p[2] != points[i - 1][2]]


def with_costs(ledger: dict[str, Any], prices: Prices) -> dict[str, Any]:
    """`ledger` with its `prices` and `cost` (re)computed from its rank-seconds."""
    rank_s = ledger["rank_seconds"]
    node_h = {k: v / prices.ranks_per_node / 3600.0 for k, v in rank_s.items()}
    billed = sum(node_h.values())
    cost: dict[str, Any] = {"node_hours": billed, "node_hours_by_bucket": node_h}
    if prices.spot_per_node_hour > 0:
        cost["spot_usd"] = billed * prices.spot_per_node_hour
        cost["faults_usd"] = (node_h["lost"] + node_h["restart"]) * prices.spot_per_node_hour
    if prices.on_demand_per_node_hour > 0:
        cost["on_demand_fault_free_usd"] = (
            (node_h["useful"] + node_h["startup"]) * prices.on_demand_per_node_hour)
    if "spot_usd" in cost and cost.get("on_demand_fault_free_usd"):
        cost["spot_over_on_demand"] = cost["spot_usd"] / cost["on_demand_fault_free_usd"]
    return {**ledger, "prices": asdict(prices), "cost": cost}


def interruption_times(records: Iterable[dict[str, Any]]) -> list[float]:
    """Unix times of the run's interruptions (the last line before each restart), for
    `elastic_train.interval.AdaptiveInterval.observe_interruption`."""
    return compute_ledger(records)["interruptions"]


# --- storage: ledger.json beside the checkpoints ---------------------------------------------

def _fs_and_path(run_uri: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    if "://" not in run_uri:
        run_uri = os.path.abspath(os.path.expanduser(run_uri))
    fs, root = fsspec.core.url_to_fs(run_uri, **dict(storage_options or {}))
    return fs, root.rstrip("/") + "/" + LEDGER_FILE


def write_ledger(run_uri: str, metrics_path: str, prices: Prices | None = None,
                 extra: Mapping[str, Any] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 restart_allowance_s: float = DEFAULT_RESTART_ALLOWANCE_S
                 ) -> dict[str, Any] | None:
    """Compute the ledger from `metrics_path` and write `{run_uri}/ledger.json`. Rank 0 calls it
    (after a commit, and at the end). `extra` (e.g. {"interval": AdaptiveInterval.state_dict()})
    is stored under "extra". Never raises: on any failure it logs a warning and returns None,
    because a ledger must never stop training. Local writes are atomic (temp file, rename);
    object stores replace the object whole."""
    try:
        ledger = compute_ledger(read_lines(metrics_path), prices or Prices.from_env(),
                                restart_allowance_s)
        if extra:
            ledger["extra"] = dict(extra)
        # The data module's writer: rename locally, one whole put on object stores. Imported
        # here: it pulls in torch, which `report` does not need.
        from elastic_train.data import _write_atomic

        fs, path = _fs_and_path(run_uri, storage_options)
        _write_atomic(fs, path, json.dumps(ledger, indent=1).encode())
        return ledger
    except Exception as e:  # noqa: BLE001 - see docstring: never fail the trainer
        log.warning("ledger not written to %s: %s", run_uri, e)
        return None


class LedgerWriter:
    """Keeps `{run_uri}/ledger.json` current from rank 0's checkpoint events.

    Pass every event dict the checkpoint manager reports to `on_event` (after it is in
    metrics.jsonl); on a `commit` it rewrites the ledger, at most once per `min_interval_s` so
    frequent small saves do not reread the metrics each time. Call `write()` once at the end.
    `extra` is a callable returning what to keep under "extra" (e.g. the adaptive interval's
    state). Like `write_ledger`, it never raises.
    """

    def __init__(self, run_uri: str, metrics_path: str, prices: Prices | None = None,
                 extra: Callable[[], Mapping[str, Any]] | None = None,
                 min_interval_s: float = 10.0,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.run_uri, self.metrics_path = run_uri, metrics_path
        self.prices = prices or Prices.from_env()
        self.extra = extra
        self.min_interval_s = min_interval_s
        self.storage_options = storage_options
        self._last = -math.inf
        self._lock = threading.Lock()

    def on_event(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "commit" and time.monotonic() - self._last >= self.min_interval_s:
            self.write()

    def write(self) -> dict[str, Any] | None:
        if not self._lock.acquire(blocking=False):
            return None  # a write is under way in another thread: it is as good
        try:
            self._last = time.monotonic()
            try:
                extra = dict(self.extra()) if self.extra else None
            except Exception as e:  # noqa: BLE001 - never fail the trainer
                log.warning("ledger extra failed: %s", e)
                extra = None
            return write_ledger(self.run_uri, self.metrics_path, self.prices, extra,
                                self.storage_options)
        finally:
            self._lock.release()


def restore_interval(interval: Any, ledger: Mapping[str, Any] | None,
                     metrics_path: str | None = None) -> None:
    """Give a fresh `elastic_train.interval.AdaptiveInterval` what the run's history knows.

    From a kept `ledger`: the state under extra["interval"] and its interruption times. From
    `metrics_path` when it is readable (call this before the new `start` line is written): its
    interruption times, and the restart now under way, when the file's last line is not `done`,
    at the time of that last line. That is the time the ledger gives the same interruption once
    it is rewritten, so the interval's deduplication keeps every interruption once. The ledger
    alone misses the restart under way (it was written at a commit before the failure). A
    missing or odd ledger or file changes nothing."""
    if ledger:
        state = (ledger.get("extra") or {}).get("interval")
        if isinstance(state, dict):
            interval.load_state_dict(state)
        for t in ledger.get("interruptions") or []:
            if isinstance(t, (int, float)):
                interval.observe_interruption(t)
        if isinstance(ledger.get("first_time"), (int, float)):
            interval.start_at(ledger["first_time"])
    if metrics_path:
        try:
            records = read_lines(metrics_path)
        except OSError:
            return
        if not records:
            return
        led = compute_ledger(records)
        for t in led["interruptions"]:
            interval.observe_interruption(t)
        last = max(records, key=lambda r: r["time"])
        if last.get("event") != "done":
            interval.observe_interruption(last["time"])
        if led["first_time"] is not None:
            interval.start_at(led["first_time"])


def read_ledger(run_uri: str, storage_options: Mapping[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """The ledger.json under `run_uri`, or None when there is none. Raises OSError or ValueError
    when it exists but cannot be read or parsed."""
    fs, path = _fs_and_path(run_uri, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


# --- report ----------------------------------------------------------------------------------

def _hms(s: float) -> str:
    s = int(round(max(0.0, s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def format_table(ledger: dict[str, Any], title: str) -> str:
    """The ledger as a plain-text table."""
    wall = ledger["wall_s"] or 0.0
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ledger["last_time"] or 0))
    out = [f"run: {title}",
           f"state: {ledger['state']} as of {when}; last step {ledger['last_step']}, "
           f"world size {ledger['world_size']}",
           f"wall time {_hms(wall)}; goodput {_fmt(ledger['goodput'])} (useful / wall); "
           f"{ledger['restarts']} restart(s), {ledger['notices']} notice(s), "
           f"{ledger['commits']} commit(s), {ledger['save_failures']} failed save(s)",
           "",
           f"{'where the time went':<34}{'seconds':>10}{'share':>8}{'node-hours':>12}"]
    notes = {"useful": f" ({ledger['steps']['useful']} steps)",
             "lost": f" ({ledger['steps']['lost']} steps)"}
    node_h = ledger["cost"]["node_hours_by_bucket"]
    for b in BUCKETS:
        s = ledger["time_s"][b]
        share = s / wall if wall > 0 else 0.0
        label = BUCKET_LABELS[b] + notes.get(b, "")
        out.append(f"{label:<34}{s:>10.1f}{share:>8.1%}{node_h[b]:>12.4f}")
    out.append(f"{'total':<34}{sum(ledger['time_s'].values()):>10.1f}"
               f"{(sum(ledger['time_s'].values()) / wall if wall else 0):>8.1%}"
               f"{ledger['cost']['node_hours']:>12.4f}")
    p, c = ledger["prices"], ledger["cost"]
    out.append("")
    if "spot_usd" in c:
        out.append(f"cost at spot ${p['spot_per_node_hour']:.4g}/node-hour: ${c['spot_usd']:.4f} "
                   f"(of which faults ${c['faults_usd']:.4f})")
    if "on_demand_fault_free_usd" in c:
        out.append(f"on-demand at ${p['on_demand_per_node_hour']:.4g}/node-hour, no faults: "
                   f"${c['on_demand_fault_free_usd']:.4f}")
    if "spot_over_on_demand" in c:
        out.append(f"spot / on-demand: {c['spot_over_on_demand']:.2f}")
    if "spot_usd" not in c and "on_demand_fault_free_usd" not in c:
        out.append("cost: no prices given (--spot-price, --on-demand-price, USD per node-hour)")
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot(ledger: dict[str, Any], path: str, title: str = "") -> str:
    """Draw the ledger to a PNG at `path` (matplotlib, Agg): progress over time with restarts
    and waits shaded, world size, and the buckets as one bar. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"useful": "#2ca02c", "lost": "#d62728", "checkpoint_stall": "#9467bd",
              "restart": "#ff7f0e", "waiting_for_capacity": "#7f7f7f", "startup": "#17becf",
              "other": "#bcbd22"}
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(9, 5.5), height_ratios=[4, 1])
    t0 = ledger["first_time"] or 0.0
    pts = ledger["timeline"]
    incs = ledger["incarnations"]
    for prev, inc in zip(incs, incs[1:], strict=False):
        gap_end = inc["start"]
        allowance_end = min(gap_end, prev["end"] + ledger["restart_allowance_s"])
        ax.axvspan(prev["end"] - t0, allowance_end - t0, color=colors["restart"], alpha=0.3, lw=0)
        if gap_end > allowance_end:
            ax.axvspan(allowance_end - t0, gap_end - t0, color=colors["waiting_for_capacity"],
                       alpha=0.3, lw=0)
    for k, inc in enumerate(incs):
        seg = [p for p in pts if inc["start"] - 1e-6 <= p[0] <= inc["end"] + 1e-6]
        # Steps above what a later incarnation restored were rolled back: draw them as lost.
        kept = min([int(j["restored_step"] or 0) for j in incs[k + 1:]], default=math.inf)
        for bucket, part in (("useful", [p for p in seg if p[1] <= kept]),
                             ("lost", [p for p in seg if p[1] >= kept])):
            if part:
                ax.plot([p[0] - t0 for p in part], [p[1] for p in part], color=colors[bucket],
                        lw=1.5)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("step")
    ax.set_title(title or "run ledger")
    if pts:
        ws = ax.twinx()
        ws.step([p[0] - t0 for p in pts], [p[2] for p in pts], where="post", color="black",
                lw=0.8, alpha=0.6)
        ws.set_ylabel("world size")
        ws.set_ylim(0, max(p[2] for p in pts) + 1)
    left = 0.0
    wall = ledger["wall_s"] or 1.0
    for b in BUCKETS:
        s = ledger["time_s"][b]
        if s <= 0:
            continue
        bar.barh([0], [s / wall], left=[left], color=colors[b],
                 label=f"{BUCKET_LABELS[b]} {s / wall:.0%}")
        left += s / wall
    bar.set_xlim(0, 1)
    bar.set_yticks([])
    bar.set_xlabel("share of wall time")
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _resolve(target: str, metrics: str | None) -> tuple[str | None, str | None, str | None]:
    """(metrics.jsonl path, run URI holding ledger.json, local dir for the plot)."""
    if metrics:
        return metrics, None, os.path.dirname(os.path.abspath(metrics))
    local = target[len("file://"):] if target.startswith("file://") else target
    if "://" not in local:
        if os.path.isfile(local):
            return local, None, os.path.dirname(os.path.abspath(local))
        if os.path.isfile(os.path.join(local, "metrics.jsonl")):
            return os.path.join(local, "metrics.jsonl"), None, local
        if os.path.isfile(os.path.join(local, "checkpoints", LEDGER_FILE)):
            return None, os.path.join(local, "checkpoints"), local
        return None, local, local if os.path.isdir(local) else None
    return None, target, None


def _report_command(args: argparse.Namespace) -> int:
    metrics, uri, plot_dir = _resolve(args.target, args.metrics)
    prices = None
    if metrics:
        try:
            records = read_lines(metrics)
        except OSError as e:
            print(f"elastic-train report: cannot read {metrics}: {e}", file=sys.stderr)
            return 1
        ledger = compute_ledger(records, restart_allowance_s=args.restart_allowance)
        if plot_dir:  # the prices the trainer was given, from the default checkpoint place
            try:
                kept = read_ledger(os.path.join(plot_dir, "checkpoints"))
            except (OSError, ValueError):
                kept = None
            if kept and isinstance(kept.get("prices"), dict):
                prices = Prices(**kept["prices"])
    else:
        try:
            ledger = read_ledger(uri or args.target)
        except (OSError, ValueError) as e:
            print(f"elastic-train report: cannot read the ledger under {uri}: {e}",
                  file=sys.stderr)
            return 1
        if ledger is None:
            print(f"elastic-train report: no metrics.jsonl or {LEDGER_FILE} at {args.target}",
                  file=sys.stderr)
            return 1
        prices = Prices(**ledger.get("prices", {}))
    prices = prices or Prices.from_env()
    if args.spot_price is not None:
        prices.spot_per_node_hour = args.spot_price
    if args.on_demand_price is not None:
        prices.on_demand_per_node_hour = args.on_demand_price
    if args.ranks_per_node is not None:
        prices.ranks_per_node = args.ranks_per_node
    ledger = with_costs(ledger, prices)
    if args.json:
        print(json.dumps(ledger, indent=1))
    else:
        print(format_table(ledger, args.target))
    if not args.no_plot and ledger["incarnations"]:
        path = args.plot or os.path.join(plot_dir or ".", "ledger.png")
        plot(ledger, path, title=args.target)
        if not args.json:
            print(f"plot: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="where a run's time and money went (works while it runs)",
        description="Reads RUN's metrics.jsonl (a run dir or the file itself) when it is local, "
                    "else the ledger.json the trainer keeps beside the checkpoints (a "
                    "checkpoint URI: s3://, gs://, file://). Prints a table and draws a PNG.",
    )
    p.add_argument("target", metavar="RUN", help="run dir, metrics.jsonl, or checkpoint URI")
    p.add_argument("--metrics", default=None, help="metrics.jsonl to read (overrides RUN)")
    p.add_argument("--spot-price", type=float, default=None, help="USD per node-hour on spot")
    p.add_argument("--on-demand-price", type=float, default=None,
                   help="USD per node-hour on demand")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="trainer ranks on one billed node (torchrun --nproc-per-node)")
    p.add_argument("--restart-allowance", type=float, default=DEFAULT_RESTART_ALLOWANCE_S,
                   help="seconds of a gap between incarnations counted as restart; the rest is "
                        "waiting for capacity (default %(default)s)")
    p.add_argument("--plot", default=None, help="PNG path (default: RUN/ledger.png or ./)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--json", action="store_true", help="print the ledger as JSON")
    p.set_defaults(func=_report_command)
