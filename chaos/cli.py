"""`elastic-train chaos run SCENARIO --out DIR [--seed N] [--random-faults K]`.

Registered through the `elastic_train.commands` entry point (elastic_train must not import
chaos). Exit codes: 0 every invariant held; 1 an invariant failed; 2 the scenario is invalid
(one line on stderr) or the harness could not run it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from chaos import scenario as scenario_lib
    from chaos.harness import HarnessError, Options, default_cache, run_scenario
    from chaos.report import summary_table

    try:
        scenario = scenario_lib.load(args.scenario)
        if args.random_faults is not None and args.random_faults < 0:
            raise scenario_lib.ScenarioError("--random-faults must be >= 0")
    except scenario_lib.ScenarioError as e:
        print(f"elastic-train chaos: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    options = Options(out=out, seed=args.seed, random_faults=args.random_faults,
                      timeout_s=args.timeout,
                      cache=Path(args.cache) if args.cache else default_cache(),
                      log=lambda m: print(m, flush=True))
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cluster's context manager
    # still kills every node and server it started.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        rep = run_scenario(scenario, options)
    except (HarnessError, scenario_lib.ScenarioError) as e:
        print(f"elastic-train chaos: error: {e}", file=sys.stderr)
        return 2
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


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def register(subparsers: argparse._SubParsersAction) -> None:
    chaos = subparsers.add_parser(
        "chaos", help="run a local elastic cluster with injected faults and check invariants")
    sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("run", help="run a scenario YAML; writes DIR/report.json and timeline.png")
    p.add_argument("scenario", help="scenario YAML (see chaos/scenarios/)")
    p.add_argument("--out", required=True, help="output directory (its earlier results go)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--random-faults", type=int, default=None, metavar="K",
                   help="inject K faults drawn from the seed instead of the scenario's")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before the run is stopped and reported incomplete (default 600)")
    p.add_argument("--cache", default=None,
                   help="prepared data and reference runs (default: ELASTIC_TRAIN_CHAOS_CACHE "
                        "or ~/.cache/elastic-train/chaos)")
    p.set_defaults(func=_run)
