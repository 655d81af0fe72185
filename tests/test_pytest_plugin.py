"""The `elastic_chaos` pytest plugin, as a user's test suite sees it: installed with the package,
it runs a scenario against a real local cluster, passes when every invariant holds, and fails
with the seed and a replay command when one does not."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
SCENARIO = {"name": "user-run", "nodes": 1, "seed": 3,
            "train": {"steps": 16, "checkpoint.every": 4, "data.batch_size": 4},
            "faults": [{"kind": "kill_worker", "at_step": 6}]}


def test_survives_a_crashed_worker(elastic_chaos):
    report = elastic_chaos.run(SCENARIO)
    assert report["completed"] and report["final_step"] == 16
    assert [f["kind"] for f in report["faults"]] == ["kill_worker"]


def test_a_run_that_cannot_finish_fails_with_its_seed(elastic_chaos):
    elastic_chaos.run(SCENARIO, timeout_s=0.5)


def test_a_bad_scenario_fails_with_one_line(elastic_chaos):
    elastic_chaos.run({"name": "x", "nodes": 1, "train": {},
                       "faults": [{"kind": "nuke", "at_step": 1}]})
'''


@pytest.mark.chaos
def test_the_fixture_runs_scenarios_and_reports_failures_with_a_replay_command(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-o", f"cache_dir={tmp_path / 'cache'}",
                                           "--elastic-chaos-out", str(tmp_path / "runs"))
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert "invariant(s) completed" in out and "with seed 3" in out
    assert "replay: elastic-train chaos run" in out and "--seed 3" in out
    assert "fault kind 'nuke' is not one this harness runs" in out
    assert (tmp_path / "runs").is_dir(), "--elastic-chaos-out keeps the runs"
