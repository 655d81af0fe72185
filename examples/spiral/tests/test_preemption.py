"""The spiral project's own chaos test, as a user writes one: the `elastic_chaos` fixture (the
pytest plugin installed with elastic-train) runs `chaos.yaml` on a local elastic cluster of real
torchrun agents, on CPU, and fails with the seed and a replay command if an invariant breaks.

Run it with the project installed (`pip install -e examples/spiral`): the cluster's workers
import `spiral`."""

from __future__ import annotations

from pathlib import Path

SCENARIO = Path(__file__).resolve().parents[1] / "chaos.yaml"


def test_training_survives_a_node_lost_a_crash_and_a_preemption(elastic_chaos):
    report = elastic_chaos.run(SCENARIO, timeout_s=600)
    assert report["completed"] and report["final_step"] == report["scenario"]["train"]["steps"]
    assert report["faults_not_fired"] == []
