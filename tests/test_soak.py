"""The soak command: a short real soak (2 runs, 2 random faults each, a wave among them), and its
verdict when a run breaks an invariant (exit code, seed, replay command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos import soak as soak_lib
from elastic_train.cli import main

SCENARIOS = Path(__file__).resolve().parent.parent / "chaos" / "scenarios"
CLI = [sys.executable, "-c", "import sys; from elastic_train.cli import main; "
       "sys.exit(main(sys.argv[1:]))"]


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_a_short_soak_passes_every_invariant_and_prints_the_distribution(tmp_path: Path) -> None:
    """Seeds 4 and 5 of ci-soak: a crashed worker and a noticed preemption; a wave of two
    vanished nodes and a crashed worker."""
    out = tmp_path / "soak"
    proc = subprocess.run(
        [*CLI, "chaos", "soak", str(SCENARIOS / "ci-soak.yaml"), "--runs", "2",
         "--random-faults", "2", "--seed", "4", "--out", str(out),
         "--cache", str(tmp_path / "cache"), "--timeout", "300"],
        capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("run 1/2: seed 4 ok") for line in lines), proc.stdout
    assert any(line.startswith("run 2/2: seed 5 ok") for line in lines), proc.stdout
    assert "completed                  2/2" in proc.stdout
    assert "faults_observed            2/2" in proc.stdout
    tally = json.loads((out / "soak.json").read_text())
    assert tally["runs"] == 2 and tally["failed_runs"] == []
    assert tally["outcomes"] == {"done": 2}
    kinds = tally["recovery_s"]
    assert {"kill_worker", "preempt_node", "vanish_node wave"} <= set(kinds)
    wave = kinds["vanish_node wave"]
    assert wave["n"] + wave["no_restart"] == 1  # its two losses, counted once
    assert "vanish_node" not in kinds  # no node vanished alone
    for d in kinds.values():
        if d["n"]:
            assert d["p50"] <= d["p95"] <= d["max"]
    for seed in (4, 5):
        rep = json.loads((out / f"seed-{seed}" / "report.json").read_text())
        assert rep["seed"] == seed and rep["random_faults"] == 2
        assert (out / f"seed-{seed}" / "harness.log").read_text()


def _report(ok: bool) -> dict:
    return {"outcome": "done" if ok else "timed out", "wall_s": 1.0, "final_step": 3,
            "invariants": {"completed": {"ok": ok, "detail": "no done event"}},
            "faults": [{"kind": "kill_node", "node": 1, "recovery_s": 2.5}]}


def test_a_failing_run_fails_the_soak_with_its_seed_and_replay_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    seen: list[int] = []

    def fake_run(scenario, options):  # the harness itself is tested by the chaos runs
        seen.append(options.seed)
        return _report(ok=options.seed != 12)

    monkeypatch.setattr(soak_lib, "run_scenario", fake_run)
    scenario = str(SCENARIOS / "ci-soak.yaml")
    code = main(["chaos", "soak", scenario, "--runs", "3", "--random-faults", "4", "--seed",
                 "11", "--out", str(tmp_path / "soak"), "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 1 and seen == [11, 12, 13]
    replay = (f"elastic-train chaos run {scenario} --seed 12 --random-faults 4 "
              f"--out {tmp_path / 'soak' / 'seed-12'}")
    assert f"run 2/3: seed 12 FAILED completed (timed out, step 3); replay: {replay}" in out
    assert f"FAILED seed 12 (completed): {replay}" in out
    assert "completed                  2/3" in out
    tally = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert tally["recovery_s"]["kill_node"]["n"] == 3
    assert tally["failed_runs"][0]["details"] == {"completed": "no done event"}


def test_a_wave_counts_once_from_its_first_loss_to_training_again_not_as_lone_losses() -> None:
    """Seed 3 of the 50-run soak: a lone loss, and a wave whose second loss came while the
    survivors re-formed from the first (the first's recovery_s runs through both)."""
    rep = {"outcome": "done", "invariants": {},
           "faults": [{"kind": "kill_node", "node": 1, "t": 10.949, "recovery_s": 3.643,
                       "wave": 0, "wave_offset_s": 0.0},
                      {"kind": "kill_node", "node": 2, "t": 12.73, "recovery_s": 1.862,
                       "wave": 0, "wave_offset_s": 1.158},
                      {"kind": "kill_node", "node": 0, "t": 30.0, "recovery_s": 2.1},
                      {"kind": "vanish_node", "node": 3, "t": 40.0, "recovery_s": None,
                       "wave": 4}]}
    tally = soak_lib.SoakTally()
    tally.add(0, rep, "replay")
    kinds = tally.distribution()
    assert kinds["kill_node"]["n"] == 1 and kinds["kill_node"]["max"] == 2.1
    assert kinds["kill_node wave"]["n"] == 1 and kinds["kill_node wave"]["max"] == 3.643
    assert kinds["vanish_node wave"]["no_restart"] == 1 and "vanish_node" not in kinds
    assert "kill_node wave" in tally.table()
