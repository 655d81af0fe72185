"""`elastic-train report RUN`: a run's ledger as a text table and a PNG (matplotlib, Agg).

RUN is the run URI (s3://, gs://, file://: the checkpoint URI, where rank 0 keeps every metrics
segment of every relaunch), a run dir, or a metrics.jsonl. The ledger is computed from the
metrics (the whole history under the URI), with the prices the trainer kept in ledger.json; a
URI with only a ledger.json shows that. It works from any machine that can read the bucket, and
while the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

from elastic_train.goodput.ledger import (
    BUCKET_LABELS,
    BUCKETS,
    DEFAULT_RESTART_ALLOWANCE_S,
    Ledger,
    Prices,
    compute_ledger,
    with_costs,
)
from elastic_train.goodput.store import LEDGER_FILE, read_history, read_ledger
from elastic_train.metrics import read_records
from elastic_train.run_store import METRICS_DIR

COLORS = {"useful": "#2ca02c", "lost": "#d62728", "checkpoint_stall": "#9467bd",
          "restart": "#ff7f0e", "waiting_for_capacity": "#7f7f7f", "startup": "#17becf",
          "other": "#bcbd22"}


def _hms(s: float) -> str:
    s = int(round(max(0.0, s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_table(ledger: Ledger, title: str) -> str:
    """The ledger as a plain-text table."""
    wall = ledger.wall_s or 0.0
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ledger.last_time or 0))
    out = [f"run: {title}",
           f"state: {ledger.state} as of {when}; last step {ledger.last_step}, "
           f"world size {ledger.world_size}",
           f"wall time {_hms(wall)}; goodput {_fmt(ledger.goodput)} (useful / wall); "
           f"{ledger.restarts} restart(s), {ledger.notices} notice(s), "
           f"{ledger.commits} commit(s), {ledger.save_failures} failed save(s)",
           "",
           f"{'where the time went':<34}{'seconds':>10}{'share':>8}{'node-hours':>12}"]
    notes = {"useful": f" ({ledger.steps.useful} steps)", "lost": f" ({ledger.steps.lost} steps)"}
    node_h = ledger.cost.node_hours_by_bucket
    for b in BUCKETS:
        s = ledger.time_s[b]
        share = s / wall if wall > 0 else 0.0
        label = BUCKET_LABELS[b] + notes.get(b, "")
        out.append(f"{label:<34}{s:>10.1f}{share:>8.1%}{node_h[b]:>12.4f}")
    total = sum(ledger.time_s.values())
    out.append(f"{'total':<34}{total:>10.1f}{(total / wall if wall else 0):>8.1%}"
               f"{ledger.cost.node_hours:>12.4f}")
    p, c = ledger.prices, ledger.cost
    out.append("")
    if c.spot_usd is not None:
        out.append(f"cost at spot ${p.spot_per_node_hour:.4g}/node-hour: ${c.spot_usd:.4f} "
                   f"(of which faults ${c.faults_usd:.4f})")
    if c.on_demand_fault_free_usd is not None:
        out.append(f"on-demand at ${p.on_demand_per_node_hour:.4g}/node-hour, no faults: "
                   f"${c.on_demand_fault_free_usd:.4f}")
    if c.spot_over_on_demand is not None:
        out.append(f"spot / on-demand: {c.spot_over_on_demand:.2f}")
    if c.spot_usd is None and c.on_demand_fault_free_usd is None:
        out.append("cost: no prices given (--spot-price, --on-demand-price, USD per node-hour)")
    out += ["", *format_history(ledger)]
    return "\n".join(out)


def format_history(ledger: Ledger, most: int = 20) -> list[str]:
    """One line per incarnation (each start, on whichever cluster): when, world size, what it
    restored and which steps it ran; the last `most` when there are more."""
    incs = ledger.incarnations
    lines = [f"history: {len(incs)} incarnation(s)"]
    if len(incs) > most:
        lines.append(f"  ... {len(incs) - most} earlier ones")
    t0 = ledger.first_time or 0.0
    for inc in incs[-most:]:
        restored = "scratch" if inc.restored_step is None else f"step {inc.restored_step}"
        ran = "no steps" if inc.first_step is None else f"steps {inc.first_step}-{inc.last_step}"
        lines.append(f"  +{_hms(inc.start - t0)} world {inc.world_size}, from {restored}: {ran}")
    return lines


def plot(ledger: Ledger, path: str, title: str = "") -> str:
    """Draw the ledger to a PNG at `path`: progress over time with restarts and waits shaded,
    world size, and the buckets as one bar. Returns `path`; raises OSError when it cannot be
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bar) = plt.subplots(2, 1, figsize=(9, 5.5), height_ratios=[4, 1])
    t0 = ledger.first_time or 0.0
    pts = ledger.timeline
    incs = ledger.incarnations
    for prev, inc in zip(incs, incs[1:], strict=False):
        gap_end = inc.start
        allowance_end = min(gap_end, prev.end + ledger.restart_allowance_s)
        ax.axvspan(prev.end - t0, allowance_end - t0, color=COLORS["restart"], alpha=0.3, lw=0)
        if gap_end > allowance_end:
            ax.axvspan(allowance_end - t0, gap_end - t0, color=COLORS["waiting_for_capacity"],
                       alpha=0.3, lw=0)
    for k, inc in enumerate(incs):
        seg = [p for p in pts if inc.start - 1e-6 <= p[0] <= inc.end + 1e-6]
        # Steps above what a later incarnation restored were rolled back: draw them as lost.
        kept = min([int(j.restored_step or 0) for j in incs[k + 1:]], default=math.inf)
        for bucket, part in (("useful", [p for p in seg if p[1] <= kept]),
                             ("lost", [p for p in seg if p[1] >= kept])):
            if part:
                ax.plot([p[0] - t0 for p in part], [p[1] for p in part], color=COLORS[bucket],
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
    wall = ledger.wall_s or 1.0
    for b in BUCKETS:
        s = ledger.time_s[b]
        if s <= 0:
            continue
        bar.barh([0], [s / wall], left=[left], color=COLORS[b],
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
    """(metrics.jsonl path, run URI holding the history and ledger.json, local dir for the
    plot). A local run dir whose checkpoints hold metrics segments is read as its URI: the
    segments are the whole history, its metrics.jsonl only this cluster's part."""
    if metrics:
        return metrics, None, os.path.dirname(os.path.abspath(metrics))
    local = target[len("file://"):] if target.startswith("file://") else target
    if "://" not in local:
        if os.path.isfile(local):
            return local, None, os.path.dirname(os.path.abspath(local))
        home = os.path.join(local, "checkpoints")
        if os.path.isdir(os.path.join(home, METRICS_DIR)):
            return None, home, local
        if os.path.isfile(os.path.join(local, "metrics.jsonl")):
            return os.path.join(local, "metrics.jsonl"), None, local
        if os.path.isfile(os.path.join(home, LEDGER_FILE)):
            return None, home, local
        return None, local, local if os.path.isdir(local) else None
    return None, target, None


def _load(target: str, metrics: str | None, plot_dir: str | None, uri: str | None,
          restart_allowance_s: float) -> tuple[Ledger, Prices | None]:
    """The ledger and the prices the trainer was given (if it kept a ledger.json). Raises
    OSError (one line) when there is nothing to read or it cannot be read."""
    kept_at = uri or (os.path.join(plot_dir, "checkpoints") if plot_dir else None)
    unreadable: Exception | None = None
    try:
        kept = read_ledger(kept_at) if kept_at else None
    except (OSError, ValueError) as e:  # only the prices are lost while there are metrics
        kept, unreadable = None, e
    prices = kept.prices if kept is not None else None
    if metrics:
        try:
            records = read_records(metrics)
        except OSError as e:
            raise OSError(f"cannot read {metrics}: {e}") from e
    else:
        try:
            records = read_history(uri or target)
        except OSError as e:
            raise OSError(f"cannot read the metrics under {uri or target}: {e}") from e
        if not records:
            if unreadable is not None:
                raise OSError(f"cannot read the ledger under {kept_at}: {unreadable}")
            if kept is None:
                raise OSError(f"no metrics.jsonl or {LEDGER_FILE} or {METRICS_DIR}/ segments "
                              f"at {target}")
            return kept, prices
    return compute_ledger(records, restart_allowance_s=restart_allowance_s), prices


def _report_command(args: argparse.Namespace) -> int:
    """Print (and draw) the ledger. Returns 1, with one line on stderr, when there is nothing
    to read or it cannot be read."""
    metrics, uri, plot_dir = _resolve(args.target, args.metrics)
    try:
        ledger, prices = _load(args.target, metrics, plot_dir, uri, args.restart_allowance)
    except OSError as e:
        print(f"elastic-train report: {e}", file=sys.stderr)
        return 1
    prices = prices or Prices.from_env()
    for name, given in (("spot_per_node_hour", args.spot_price),
                        ("on_demand_per_node_hour", args.on_demand_price),
                        ("ranks_per_node", args.ranks_per_node)):
        if given is not None:
            prices = replace(prices, **{name: given})
    ledger = with_costs(ledger, prices)
    if args.json:
        print(json.dumps(ledger.to_dict(), indent=1))
    else:
        print(format_table(ledger, args.target))
    if not args.no_plot and ledger.incarnations:
        path = args.plot or os.path.join(plot_dir or ".", "ledger.png")
        plot(ledger, path, title=args.target)
        if not args.json:
            print(f"plot: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="where a run's time and money went (works while it runs)",
        description="Computes the ledger from every metrics segment under RUN (the run URI: "
                    "s3://, gs://, file://, i.e. checkpoint.uri; all relaunches), or from a "
                    "local run dir or metrics.jsonl. Prints a table and draws a PNG.",
    )
    p.add_argument("target", metavar="RUN", help="run URI (checkpoint.uri), run dir, or "
                   "metrics.jsonl")
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
