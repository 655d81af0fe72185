"""A pytest plugin (installed with the package, entry point `pytest11`): chaos-test your own
training in your own test suite, on CPU, with the invariants asserted.

    def test_survives_preemption(elastic_chaos):
        elastic_chaos.run("tests/preemption.yaml")                  # a scenario file, or
        elastic_chaos.run({"name": "p", "nodes": 2, "train": {"model": "my_pkg.spec:SPEC",
                           "steps": 40}, "faults": [{"kind": "preempt_node", "at_step": 10}]})

`run()` starts what the scenario needs (a loopback S3 or GCS server, a local elastic cluster of
real torchrun agents), injects the faults, checks every invariant and cleans up, then returns the
report. When an invariant fails the test fails with the summary table, the run's seed and the
command that replays it (`elastic-train chaos run SCENARIO --seed S ...`): a failing seed is a bug
report. Fault-free reference runs are cached in pytest's cache directory (`.pytest_cache`), so
only the first run of a configuration pays for one.

Options: `--elastic-chaos-seed S` runs every scenario with seed S (replay); `--elastic-chaos-out
DIR` keeps each run's report, timeline and node logs under DIR (default: the test's tmp_path).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaos import scenario as scenario_lib
from chaos.harness import Options, run_scenario
from chaos.report import summary_table


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("elastic-chaos", "chaos tests of elastic training (elastic-train)")
    group.addoption("--elastic-chaos-seed", type=int, default=None, metavar="S",
                    help="run every chaos scenario with this seed (to replay a failure)")
    group.addoption("--elastic-chaos-out", default=None, metavar="DIR",
                    help="keep each chaos run's report, timeline and logs under DIR")


class ElasticChaos:
    """What the `elastic_chaos` fixture gives a test: `run()` a scenario and assert it held."""

    def __init__(self, out: Path, cache: Path, seed: int | None) -> None:
        self.out = out
        self.cache = cache
        self.seed = seed
        self.reports: list[dict[str, Any]] = []

    def run(self, scenario: str | Path | Mapping[str, Any], *, seed: int | None = None,
            random_faults: int | None = None, timeout_s: float = 600.0,
            check: bool = True) -> dict[str, Any]:
        """Run `scenario` (a YAML path or its parsed mapping) and return its report.

        With `check` (the default) the test fails unless every invariant held, showing the
        summary, the seed and the replay command. A scenario the harness refuses fails the test
        with its one-line reason. `--elastic-chaos-seed` beats `seed`, which beats the
        scenario's own."""
        try:
            if isinstance(scenario, Mapping):
                parsed = scenario_lib.from_dict(dict(scenario), "scenario")
            else:
                parsed = scenario_lib.load(scenario)
        except scenario_lib.ScenarioError as e:
            pytest.fail(f"elastic_chaos: {e}", pytrace=False)
        seed = self.seed if self.seed is not None else seed
        out = self.out / f"{len(self.reports):02d}-{_slug(parsed.name)}"
        out.mkdir(parents=True, exist_ok=True)
        # The replay command needs a file: the scenario as run, beside its report.
        source = out.parent / f"{out.name}.scenario.yaml"
        source.write_text(yaml.safe_dump(parsed.to_dict(), sort_keys=False))
        report = run_scenario(parsed, Options(out=out, seed=seed, random_faults=random_faults,
                                              timeout_s=timeout_s, cache=self.cache,
                                              log=lambda message: None))
        self.reports.append(report)
        failed = [name for name, v in report["invariants"].items() if not v["ok"]]
        if check and failed:
            replay = (f"elastic-train chaos run {source} --seed {report['seed']} "
                      f"--out {out}-replay")
            if random_faults is not None:
                replay += f" --random-faults {random_faults}"
            pytest.fail(f"elastic_chaos: invariant(s) {', '.join(failed)} failed with seed "
                        f"{report['seed']}\n\n{summary_table(report)}\n\nreplay: {replay}\n"
                        f"logs:   {report['logs_dir']}", pytrace=False)
        return report


@pytest.fixture
def elastic_chaos(request: pytest.FixtureRequest, tmp_path: Path) -> ElasticChaos:
    """Runs chaos scenarios against real local clusters; see `ElasticChaos.run`."""
    config = request.config
    kept = config.getoption("--elastic-chaos-out")
    out = Path(kept) / _slug(request.node.name) if kept else tmp_path / "chaos"
    cache = Path(config.cache.mkdir("elastic-chaos")) if getattr(config, "cache", None) \
        else tmp_path / "chaos-cache"
    return ElasticChaos(out, cache, config.getoption("--elastic-chaos-seed"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"
