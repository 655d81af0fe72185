"""`elastic-train chaos run SCENARIO --out DIR [--seed N] [--random-faults K]` (a group-mode
scenario, `chaos/scenarios/group/`, runs under `chaos.skygroup`) and
`elastic-train chaos soak SCENARIO --runs N --random-faults K [--seed S] [--out DIR]`.

Registered through the `elastic_train.commands` entry point (elastic_train must not import
chaos). Exit codes: 0 every invariant held (in every run of a soak); 1 an invariant failed; 2 the
scenario or an option is invalid (one line on stderr) or the harness could not run it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos.scenario import Scenario


def _error(message: object) -> int:
    print(f"elastic-train chaos: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> Scenario:
    """The scenario, with the options checked; raises ScenarioError (one line)."""
    from chaos import scenario as scenario_lib

    scenario = scenario_lib.load(args.scenario)
    if args.random_faults is not None and args.random_faults < 0:
        raise scenario_lib.ScenarioError(f"--random-faults {args.random_faults}: must be >= 0")
    if getattr(args, "runs", 1) < 1:
        raise scenario_lib.ScenarioError(f"--runs {args.runs}: must be >= 1")
    _check_timeout_and_unwind_on_sigterm(args)
    return scenario


def _check_timeout_and_unwind_on_sigterm(args: argparse.Namespace) -> None:
    """Raises ScenarioError (one line) for a bad --timeout. Then SIGTERM (a CI timeout, `kill`)
    unwinds like Ctrl-C, so the cluster's context manager still kills every node and server
    it started."""
    from chaos.scenario import ScenarioError

    if args.timeout <= 0:
        raise ScenarioError(f"--timeout {args.timeout:g}: must be > 0 seconds")
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _cache(args: argparse.Namespace) -> Path:
    from chaos.harness import default_cache

    return Path(args.cache) if args.cache else default_cache()


def _command(body: Callable[[argparse.Namespace, Scenario], int],
             ) -> Callable[[argparse.Namespace], int]:
    """A subcommand: the scenario loaded and checked, then `body`; a bad scenario or a run that
    cannot start is one line on stderr and exit code 2."""

    def command(args: argparse.Namespace) -> int:
        from chaos.harness import HarnessError
        from chaos.scenario import ScenarioError

        try:
            return body(args, _load(args))
        except (HarnessError, ScenarioError) as e:
            return _error(e)

    return command


def _run_any(args: argparse.Namespace) -> int:
    """`chaos run`: a cluster scenario, or a group-mode one (`chaos/scenarios/group/`, run as
    SkyPilot runs a job group: `chaos.skygroup`). A file that is neither gets the cluster
    scenario's error."""
    from chaos import skygroup
    from chaos.harness import HarnessError
    from chaos.report import invariant_lines
    from chaos.scenario import ScenarioError

    try:
        group = skygroup.load_scenario(args.scenario)
    except ScenarioError:
        return _command(_run)(args)
    for flag, value in (("--seed", args.seed), ("--random-faults", args.random_faults),
                        ("--cache", args.cache)):
        if value is not None:
            return _error(f"{flag}: not for a group scenario ({args.scenario}); it runs its "
                          "own faults and seed")
    out = Path(args.out)
    try:
        _check_timeout_and_unwind_on_sigterm(args)
        run = skygroup.run_scenario(group, out, timeout_s=args.timeout,
                                    log=lambda m: print(m, flush=True))
    except (HarnessError, ScenarioError) as e:
        return _error(e)
    rep = run.report
    print(f"\nscenario {group.name} (job group): "
          f"{'finished' if rep['finished'] else 'NOT finished'}\n")
    print("\n".join(invariant_lines(rep["invariants"])))
    print(f"\nreport:   {out / 'report.json'}")
    return 0 if rep["finished"] and all(v["ok"] for v in rep["invariants"].values()) else 1


def _run(args: argparse.Namespace, scenario: Scenario) -> int:
    from chaos.harness import Options, run_scenario
    from chaos.report import summary_table

    out = Path(args.out)
    rep = run_scenario(scenario, Options(out=out, seed=args.seed, random_faults=args.random_faults,
                                         timeout_s=args.timeout, cache=_cache(args),
                                         log=lambda m: print(m, flush=True)))
    print()
    print(summary_table(rep))
    print()
    print(f"report:   {out / 'report.json'}")
    print(f"timeline: {out / 'timeline.png'}")
    kept = "" if rep["run_uri"].startswith("file://") else \
        " (gone: the loopback server stopped with the run; use storage: file to keep them)"
    print(f"checkpoints: {rep['run_uri']}{kept}")
    ok = all(v["ok"] for v in rep["invariants"].values())
    return 0 if ok else 1


def _soak(args: argparse.Namespace, scenario: Scenario) -> int:
    from chaos.soak import soak

    out = Path(args.out)
    seed = scenario.seed if args.seed is None else args.seed
    print(f"soak {scenario.name}: {args.runs} run(s), {args.random_faults} random fault(s) "
          f"each, seeds {seed}..{seed + args.runs - 1}, results in {out}", flush=True)
    tally = soak(scenario, args.scenario, runs=args.runs, random_faults=args.random_faults,
                 seed=seed, out=out, cache=_cache(args), timeout_s=args.timeout,
                 log=lambda m: print(m, flush=True))
    print()
    print(tally.table())
    for f in tally.failed:
        print(f"FAILED seed {f['seed']} ({', '.join(f['failed'])}): {f['replay']}")
    print(f"\nsummary: {out / 'soak.json'}")
    return 0 if tally.ok else 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def register(subparsers: argparse._SubParsersAction) -> None:
    chaos = subparsers.add_parser(
        "chaos", help="run a local elastic cluster with injected faults and check invariants")
    sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("run", help="run a scenario YAML (a cluster or a job group); writes "
                                   "DIR/report.json (and a cluster's timeline.png)")
    _scenario_options(p)
    p.add_argument("--out", required=True, help="output directory (its earlier results go)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--random-faults", type=int, default=None, metavar="K",
                   help="inject K faults drawn from the seed instead of the scenario's")
    p.set_defaults(func=_run_any)
    p = sub.add_parser("soak", help="run a scenario N times with K random faults from seeds "
                                    "S..S+N-1; per-invariant pass counts, recovery p50/p95/max")
    _scenario_options(p)
    p.add_argument("--runs", type=int, required=True, metavar="N", help="how many runs")
    p.add_argument("--random-faults", type=int, required=True, metavar="K",
                   help="faults drawn per run (every kind, vanished nodes and waves included)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="the first run's seed (default: the scenario's)")
    p.add_argument("--out", default="runs/soak",
                   help="output directory: DIR/seed-S/ per run, DIR/soak.json (default runs/soak)")
    p.set_defaults(func=_command(_soak))


def _scenario_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario YAML (see chaos/scenarios/)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a run is stopped and reported incomplete (default 600)")
    p.add_argument("--cache", default=None,
                   help="prepared data and reference runs (default: ELASTIC_TRAIN_CHAOS_CACHE "
                        "or ~/.cache/elastic-train/chaos)")
