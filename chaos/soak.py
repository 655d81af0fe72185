"""The soak: one scenario run again and again, each time with K faults drawn from another seed.

`soak(scenario, ...)` runs seeds S, S+1, ..., S+N-1 (`faults.draw_faults`: every fault kind,
vanished nodes and waves included), each a whole chaos run (`harness.run_scenario`) into
`{out}/seed-{s}/`, and tallies what a single run cannot show: how often each invariant held, and
the distribution of recovery times per fault kind. A run that fails prints its seed and the
command that replays it; a stuck run fails `completed` when the harness's timeout stops it.
The tally is written to `{out}/soak.json` after every run, so a soak stopped half-way keeps what
it learnt.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.harness import Options, run_scenario
from chaos.scenario import Scenario


@dataclass
class SoakTally:
    """What N runs add up to."""

    runs: int = 0
    passes: dict[str, int] = field(default_factory=dict)
    """Invariant name -> runs in which it held."""
    recoveries: dict[str, list[float]] = field(default_factory=dict)
    """Fault kind -> recovery_s of every fault of that kind that caused a restart. The losses of
    a wave count once, as "KIND wave" (see `wave_recoveries`), not under KIND: the first loss's
    own recovery_s runs on through every re-form the wave's later losses cause."""
    pauses: dict[str, list[float]] = field(default_factory=dict)
    """Fault kind -> pause_s (training standing still) of every fault of that kind that has one."""
    joins: dict[str, list[float]] = field(default_factory=dict)
    """Fault kind -> join_s of every fault of that kind that has one (an added node: from its
    agent's request to join to its first step, its boot left out)."""
    no_restart: dict[str, int] = field(default_factory=dict)
    """Fault kind -> faults of that kind after which no restart was seen."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """How runs ended (done, no nodes left, timed out) -> count."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """Per failing run: seed, the failed invariants, the command to replay it."""

    @property
    def ok(self) -> bool:
        return self.runs > 0 and not self.failed

    def add(self, seed: int, rep: dict[str, Any], replay: str) -> list[str]:
        """Count one run's report; returns the invariants it failed."""
        self.runs += 1
        self.outcomes[rep["outcome"]] = self.outcomes.get(rep["outcome"], 0) + 1
        failed = []
        for name, verdict in rep["invariants"].items():
            self.passes.setdefault(name, 0)
            if verdict["ok"]:
                self.passes[name] += 1
            else:
                failed.append(name)
        for f in rep["faults"]:
            if f.get("wave") is not None:
                continue  # counted once with its wave, below
            self._count_recovery(f["kind"], f["recovery_s"])
            for key, tally in (("pause_s", self.pauses), ("join_s", self.joins)):
                if f.get(key) is not None:
                    tally.setdefault(f["kind"], []).append(float(f[key]))
        for kind, recovery_s in wave_recoveries(rep["faults"]):
            self._count_recovery(kind, recovery_s)
        if failed:
            self.failed.append({"seed": seed, "failed": failed, "replay": replay,
                                "details": {k: rep["invariants"][k]["detail"] for k in failed}})
        return failed

    def _count_recovery(self, kind: str, recovery_s: float | None) -> None:
        if recovery_s is None:
            self.no_restart[kind] = self.no_restart.get(kind, 0) + 1
        else:
            self.recoveries.setdefault(kind, []).append(float(recovery_s))

    def distribution(self) -> dict[str, dict[str, float | int | None]]:
        """Per fault kind: n, p50, p95, max recovery seconds, the p50 pause, the p50 and p95
        from a join request (added nodes), and faults with no restart."""
        kinds = sorted(set(self.recoveries) | set(self.no_restart))
        out: dict[str, dict[str, float | int | None]] = {}
        for kind in kinds:
            joins = percentiles(self.joins.get(kind, []))
            out[kind] = {**percentiles(self.recoveries.get(kind, [])),
                         "pause_p50": percentiles(self.pauses.get(kind, []))["p50"],
                         "join_p50": joins["p50"], "join_p95": joins["p95"],
                         "no_restart": self.no_restart.get(kind, 0)}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "invariant_passes": self.passes,
                "recovery_s": self.distribution(), "outcomes": self.outcomes,
                "failed_runs": self.failed}

    def table(self) -> str:
        """The text printed at the end: invariant pass counts, then recoveries per fault kind."""
        lines = [f"{'invariant':<26} passed"]
        lines += [f"{name:<26} {n}/{self.runs}" for name, n in self.passes.items()]
        lines += ["", f"{'fault':<16}{'n':>4}{'p50(s)':>9}{'p95(s)':>9}{'max(s)':>9}"
                      f"{'pause p50':>11}{'join p50':>10}{'join p95':>10}{'no restart':>12}"]
        for kind, d in self.distribution().items():
            widths = {"p50": 9, "p95": 9, "max": 9, "pause_p50": 11, "join_p50": 10,
                      "join_p95": 10}
            cells = "".join(f"{'-':>{w}}" if d[k] is None else f"{d[k]:>{w}.1f}"
                            for k, w in widths.items())
            lines.append(f"{kind:<16}{d['n']:>4}{cells}{d['no_restart']:>12}")
        lines += ["", "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.outcomes.items())]
        return "\n".join(lines)


def wave_recoveries(faults: list[dict[str, Any]]) -> list[tuple[str, float | None]]:
    """("KIND wave", seconds) per wave among a report's `faults`: from its first loss to the first
    step trained after the last restart any of its losses caused (None if none caused one)."""
    waves: dict[int, list[dict[str, Any]]] = {}
    for f in faults:
        if f.get("wave") is not None:
            waves.setdefault(int(f["wave"]), []).append(f)
    out: list[tuple[str, float | None]] = []
    for losses in waves.values():
        first = min(float(f["t"]) for f in losses)
        trained = [float(f["t"]) + float(f["recovery_s"]) for f in losses
                   if f["recovery_s"] is not None]
        out.append((f"{losses[0]['kind']} wave",
                    round(max(trained) - first, 3) if trained else None))
    return out


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """n, p50, p95 (inclusive interpolation between the sorted values) and max of `values`."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 \
        else values[0]
    return {"n": len(values), "p50": round(statistics.median(values), 3),
            "p95": round(p95, 3), "max": round(max(values), 3)}


def replay_command(scenario_path: str, seed: int, k: int, out: Path, timeout_s: float) -> str:
    """The `elastic-train chaos run` command that repeats one run of a soak."""
    args = ["elastic-train", "chaos", "run", scenario_path, "--seed", str(seed),
            "--random-faults", str(k), "--out", str(out)]
    if timeout_s != Options.timeout_s:
        args += ["--timeout", f"{timeout_s:g}"]
    return shlex.join(args)


def soak(scenario: Scenario, scenario_path: str, *, runs: int, random_faults: int, seed: int,
         out: Path, cache: Path, timeout_s: float = Options.timeout_s,
         log: Callable[[str], None] = print) -> SoakTally:
    """Run `runs` seeded variations of `scenario` and tally them (see the module docstring).

    Each run's own progress goes to `{out}/seed-{s}/harness.log`; `log` gets one line as each
    run starts and ends. Raises HarnessError when a run cannot start at all (the reference run
    failed): a soak of runs that never ran proves nothing."""
    tally = SoakTally()
    out.mkdir(parents=True, exist_ok=True)
    for n in range(runs):
        s = seed + n
        run_out = out / f"seed-{s}"
        run_out.mkdir(parents=True, exist_ok=True)
        with open(run_out / "harness.log", "w") as harness_log:
            def write(line: str, f: Any = harness_log) -> None:
                f.write(line + "\n")
                f.flush()

            log(f"run {n + 1}/{runs}: seed {s} ...")
            rep = run_scenario(scenario, Options(out=run_out, seed=s, random_faults=random_faults,
                                                 timeout_s=timeout_s, cache=cache, log=write))
        replay = replay_command(scenario_path, s, random_faults, run_out, timeout_s)
        failed = tally.add(s, rep, replay)
        faults = _faults_line(rep)
        if failed:
            log(f"run {n + 1}/{runs}: seed {s} FAILED {', '.join(failed)} "
                f"({rep['outcome']}, step {rep['final_step']}); replay: {replay}")
        else:
            log(f"run {n + 1}/{runs}: seed {s} ok in {rep['wall_s']:.0f} s: {faults}")
        (out / "soak.json").write_text(json.dumps(tally.as_dict(), indent=2) + "\n")
    return tally


def _faults_line(rep: dict[str, Any]) -> str:
    parts = []
    for f in rep["faults"]:
        where = f" n{f['node']}" if f.get("node") is not None else ""
        took = "no restart" if f["recovery_s"] is None else f"{f['recovery_s']:.1f} s"
        parts.append(f"{f['kind']}{where} {took}")
    return "; ".join(parts) or "no faults"
