"""report.json (contracts/report.schema.json) and timeline.png of a chaos run.

What each fault cost is read from the metrics after the run. For a fault at time T (a
preempt_node: when the notice was given) the restart it caused is the first `start` event after T
that comes before the next fault fired later than T + 0.5 s (add_node: the first start after T
with a larger world, whenever it comes; preempt_node: the first with a smaller one); with none,
the fault caused no restart:

- recovery_s: T -> the first step line after that start (the first step completed in the new
  world); null without a restart. An added node that joined is timed to the first start after
  its agent started its workers (its log says when), whatever the size of that world.
- pause_s: the last step line before that start -> the first one after it: how long training
  stood still (for an added node, the survivors' pause to let it in; its boot is not in it).
- boot_s, join_s (an added node that joined): T -> its agent's first request to join (its
  process start and imports: on this machine beside the running trainers, on a cloud the VM's
  own), and that request -> the first step it trained in; together they make recovery_s.
- world_after: that step's world size (world_before without a restart).
- lost_steps: the last step reported before that start minus the step it restored (steps that
  were computed and thrown away); 0 without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from chaos.faults import Fired, changed_no_world
from chaos.metrics import Record, events, is_step, step_records
from chaos.scenario import schema
from elastic_train.events import Event

SAME_MOMENT_S = 0.5
"""Faults fired within this of each other share the restart that follows them."""


def summarize_faults(fired: list[Fired], records: list[Record], t0: float) -> list[dict[str, Any]]:
    """One report entry per fired fault (schema: report.faults[])."""
    entries = []
    times = sorted(f.time for f in fired)
    for f, unseen in zip(fired, changed_no_world(fired), strict=True):
        cause = f.time
        later = [t for t in times if t > f.time + SAME_MOMENT_S]
        if f.detail.get("joined_at") is not None:
            # The added node's agent logged when it started its workers: the world it joined
            # is the first to start after that, whatever its size (a node lost in the same
            # re-form leaves it unchanged) and whichever fault came between.
            joined_at = float(f.detail["joined_at"])
            start_i = next((i for i, r in enumerate(records) if r.get("event") == Event.START
                            and float(r["time"]) >= joined_at), None)
        elif f.fault.kind in ("add_node", "preempt_node"):
            # A node joins when it is ready, and a noticed node leaves when its save is done,
            # maybe after later faults fired: the restart is the first larger (smaller) world.
            grow = f.fault.kind == "add_node"
            start_i = next((i for i, r in enumerate(records)
                            if r.get("event") == Event.START and cause < float(r["time"])
                            and (int(r.get("world_size", 0)) > f.world_before) == grow
                            and int(r.get("world_size", 0)) != f.world_before), None)
        else:
            window_end = later[0] if later else float("inf")
            start_i = next((i for i, r in enumerate(records) if r.get("event") == Event.START
                            and cause < float(r["time"]) < window_end), None)
        if unseen:  # no pause of its own: a later re-form is another fault's
            start_i = None
        recovery_s: float | None = None
        pause_s: float | None = None
        world_after = f.world_before
        lost = 0
        if start_i is not None:
            start = records[start_i]
            before = [r for r in records[:start_i] if is_step(r)]
            lost = max(0, max((int(r["step"]) for r in before), default=0)
                       - int(start.get("restored_step") or 0))
            first = next((r for r in records[start_i + 1:] if is_step(r)), None)
            if first is not None:
                recovery_s = round(float(first["time"]) - cause, 3)
                if before:
                    pause_s = round(float(first["time"]) - float(before[-1]["time"]), 3)
                world_after = int(first["world_size"])
            else:
                world_after = int(start.get("world_size", world_after))
        entry: dict[str, Any] = {
            "kind": f.fault.kind,
            "node": f.node,
            "at_step": f.at_step,
            "t": round(f.time - t0, 3),
            "world_before": f.world_before,
            "world_after": world_after,
            "recovery_s": recovery_s,
            "pause_s": pause_s,
            "lost_steps": lost,
        }
        if f.detail.get("joining_at") is not None:
            entry["boot_s"] = round(float(f.detail["joining_at"]) - cause, 3)
            if recovery_s is not None:
                entry["join_s"] = round(recovery_s - entry["boot_s"], 3)
        if f.fault.during is not None:
            entry["during"] = f.fault.during
        if f.removed_at is not None:
            entry["removed_t"] = round(f.removed_at - t0, 3)
        entry.update({k: v for k, v in f.detail.items()
                      if k not in ("pid", "joined_at", "joining_at")})
        entries.append(entry)
    return entries


def validate(report: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when the report breaks its contract
    (contracts/report.schema.json)."""
    jsonschema.validate(report, schema("report"))


def write(report: dict[str, Any], out: Path) -> Path:
    validate(report)
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def plot_timeline(records: list[Record], faults: list[dict[str, Any]], t0: float, steps: int,
                  path: Path, title: str) -> Path:
    """Step progress and world size against time, with faults and checkpoint commits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_world) = plt.subplots(
        2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps_r = step_records(records)
    xs = [float(r["time"]) - t0 for r in steps_r]
    ax_step.plot(xs, [int(r["step"]) for r in steps_r], ".", ms=2.5, color="tab:blue",
                 label="step reported")
    commits = events(records, Event.COMMIT)
    if commits:
        ax_step.plot([float(r["time"]) - t0 for r in commits], [int(r["step"]) for r in commits],
                     "D", ms=5, color="tab:green", label="checkpoint committed")
    starts = events(records, Event.START)
    if starts:
        ax_step.plot([float(r["time"]) - t0 for r in starts],
                     [int(r.get("restored_step") or 0) for r in starts],
                     "^", ms=6, color="tab:orange", label="(re)start: restored step")
    ax_step.axhline(steps, color="grey", lw=0.8, ls=":")
    colors = {"kill_node": "red", "preempt_node": "purple", "vanish_node": "black",
              "add_node": "green",
              "kill_worker": "darkorange", "hang_worker": "brown", "storage_outage": "grey"}
    for f in faults:
        c = colors.get(f["kind"], "black")
        for ax in (ax_step, ax_world):
            ax.axvline(f["t"], color=c, lw=1.2, alpha=0.8)
        where = f" n{f['node']}" if f.get("node") is not None else ""
        ax_step.annotate(f"{f['kind']}{where}", (f["t"], steps), rotation=90, fontsize=7,
                         va="top", ha="right", color=c)
    # World size as a step function over the times it was observed.
    wx, wy = [], []
    for r in records:
        if "world_size" in r and (is_step(r) or r.get("event") == Event.START):
            wx.append(float(r["time"]) - t0)
            wy.append(int(r["world_size"]))
    if wx:
        ax_world.step(wx, wy, where="post", color="tab:blue")
        ax_world.set_ylim(0, max(wy) + 1)
    ax_step.set_xlim(left=0)
    ax_step.set_ylabel("step")
    ax_step.set_title(title)
    ax_step.legend(loc="lower right", fontsize=8)
    ax_world.set_ylabel("world size")
    ax_world.set_xlabel("seconds since the run started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def invariant_lines(invariants: dict[str, dict[str, Any]]) -> list[str]:
    """One line per invariant of a report (a cluster's or a job group's): ok or FAIL, and why."""
    return [f"{'invariant':<26} {'':4} detail"] + [
        f"{name:<26} {'ok' if v['ok'] else 'FAIL':<4} {v['detail']}"
        for name, v in invariants.items()]


def summary_table(report: dict[str, Any]) -> str:
    """The text printed after a run: invariants, then faults."""
    lines = [f"scenario {report['scenario'].get('name')}: "
             f"{'completed' if report['completed'] else 'NOT completed'} at step "
             f"{report['final_step']} in {report['wall_s']:.1f} s, goodput {report['goodput']:.2f}"]
    lines.append("")
    lines += invariant_lines(report["invariants"])
    if report["faults"]:
        lines.append("")
        lines.append(f"{'fault':<16}{'node':>5}{'step':>6}{'t(s)':>8}{'world':>8}"
                     f"{'recovery(s)':>13}{'lost':>6}")
        for f in report["faults"]:
            node = "-" if f.get("node") is None else str(f["node"])
            rec = "-" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}"
            world = f"{f['world_before']}->{f['world_after']}"
            lines.append(f"{f['kind']:<16}{node:>5}{str(f.get('at_step')):>6}{f['t']:>8.1f}"
                         f"{world:>8}{rec:>13}{f['lost_steps']:>6}")
    return "\n".join(lines)
