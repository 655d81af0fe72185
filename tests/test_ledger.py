"""The run ledger from metrics records (`ledger`), ledger.json beside the checkpoints (`store`),
and `elastic-train report` (`report`)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from elastic_train.events import Event
from elastic_train.goodput import ledger as L
from elastic_train.goodput import report, store
from elastic_train.metrics import read_records, validate_record

T0 = 1_795_000_000.0


class FakeRun:
    """Writes metrics.jsonl lines the way the trainer does: rank 0's step lines carry the time
    since the previous line (so a save's stall lands in the next step's `step_time_s`), and the
    `commit` event arrives from the upload thread `commit_s` after the save began."""

    def __init__(self) -> None:
        self.t = T0
        self.lines: list[dict] = []
        self.pending: list[dict] = []  # commit events not yet due

    def _emit(self, rec: dict) -> None:
        due = [c for c in self.pending if c["time"] <= rec["time"]]
        for c in due:
            self.lines.append(c)
            self.pending.remove(c)
        self.lines.append(rec)

    def start(self, world_size: int, restored: int | None, restart: int, gap_s: float = 0.0,
              load_s: float = 0.0) -> None:
        self.pending.clear()  # a killed process never reports its upload
        self.t += gap_s
        self._emit({"event": Event.START, "time": self.t, "world_size": world_size,
                    "restored_step": restored, "restart": restart,
                    "startup_s": {"restore": load_s}})
        self.t += load_s
        self.world_size = world_size
        self.extra = 0.0

    def steps(self, first: int, last: int, step_s: float, every: int, stall_s: float = 0.05,
              commit_s: float = 0.8) -> None:
        for step in range(first, last + 1):
            dt = step_s + self.extra
            self.t += dt
            self.extra = 0.0
            self._emit({"step": step, "loss": 3.0, "lr": 1e-3, "world_size": self.world_size,
                        "batch_digest": "x", "tokens_per_s": 1.0, "step_time_s": dt,
                        "time": self.t, "restart": 0})
            if step % every == 0:
                self.extra = stall_s
                self.pending.append({"event": Event.COMMIT, "step": step, "stall_s": stall_s,
                                     "commit_s": commit_s, "time": self.t + commit_s})

    def finish(self, step: int, stall_s: float) -> None:
        self.t += stall_s
        self._emit({"event": Event.COMMIT, "step": step, "stall_s": stall_s, "commit_s": stall_s,
                    "time": self.t})
        self.t += 0.1
        self._emit({"event": Event.DONE, "step": step, "time": self.t})

    def write(self, path: str, torn_tail: bool = False) -> str:
        with open(path, "w") as f:
            for rec in self.lines:
                f.write(json.dumps(rec) + "\n")
            if torn_tail:
                f.write('{"step": 9')
        return path


def three_incarnations() -> FakeRun:
    """Killed at step 47 (restored 40, world 2 -> 1, 6 s restart), killed at step 75 (restored
    60, 300 s gap: 120 restart + 180 waiting), then to step 100 with a 1 s final save."""
    run = FakeRun()
    run.start(2, None, 0, load_s=3.0)
    run.steps(1, 47, 0.5, every=20)
    run.start(1, 40, 1, gap_s=6.0, load_s=2.0)
    run.steps(41, 75, 1.0, every=20)
    run.start(2, 60, 0, gap_s=300.0, load_s=2.0)
    run.steps(61, 100, 0.5, every=20)
    run.finish(100, stall_s=1.0)
    return run


def test_the_fake_run_writes_lines_of_the_metrics_schema():
    for line in three_incarnations().lines:
        validate_record(line)


def test_buckets_of_a_run_with_two_interruptions():
    led = L.compute_ledger(three_incarnations().lines)
    t = led.time_s
    assert led.steps == L.StepCounts(useful=100, lost=22)
    assert t["useful"] == pytest.approx(60.0)  # 40 x 0.5 + 20 x 1.0 + 40 x 0.5
    assert t["lost"] == pytest.approx(18.5)  # 41..47 at 0.5, 61..75 at 1.0
    assert t["checkpoint_stall"] == pytest.approx(4 * 0.05 + 1.0)
    assert t["restart"] == pytest.approx(6 + 2 + 120 + 2)
    assert t["waiting_for_capacity"] == pytest.approx(180.0)
    assert t["startup"] == pytest.approx(3.0)
    assert t["other"] == pytest.approx(0.1)
    assert sum(t.values()) == pytest.approx(led.wall_s)
    assert led.goodput == pytest.approx(60.0 / led.wall_s)
    assert led.restarts == 2 and led.state == "done" and led.last_step == 100
    assert led.commits == 5 + 1  # 20, 40 | 60 | 80, 100 (async) + 100 (final)
    assert [i.world_size for i in led.incarnations] == [2, 1, 2]
    # rank-seconds: the waits bill nobody; the shrunken world bills one rank
    assert led.rank_seconds["waiting_for_capacity"] == 0.0
    assert led.rank_seconds["useful"] == pytest.approx(20 * 2 + 20 * 1 + 20 * 2)


def test_interruption_times_are_the_last_lines_before_restarts():
    run = three_incarnations()
    starts = [i for i, r in enumerate(run.lines) if r.get("event") == Event.START]
    ends = [run.lines[i - 1]["time"] for i in starts[1:]]
    assert [run.lines[i - 1]["step"] for i in starts[1:]] == [47, 75]
    assert L.interruption_times(run.lines) == ends


def test_costs_from_prices():
    led = L.compute_ledger(three_incarnations().lines,
                           L.Prices(spot_per_node_hour=1.0, on_demand_per_node_hour=3.0))
    c = led.cost
    billed_h = sum(led.rank_seconds.values()) / 3600
    assert c.spot_usd == pytest.approx(billed_h)
    assert c.on_demand_fault_free_usd == pytest.approx((100 + 3 * 2) * 3.0 / 3600)
    assert c.spot_over_on_demand == pytest.approx(c.spot_usd / c.on_demand_fault_free_usd)
    halved = L.with_costs(led, L.Prices(1.0, 3.0, ranks_per_node=2)).cost
    assert halved.spot_usd == pytest.approx(c.spot_usd / 2)


def test_unknown_prices_leave_their_costs_out_of_the_document():
    doc = L.compute_ledger(three_incarnations().lines, L.Prices(spot_per_node_hour=1.0)).to_dict()
    assert set(doc["cost"]) == {"node_hours", "node_hours_by_bucket", "spot_usd", "faults_usd"}
    assert "extra" not in doc


def test_the_document_reads_back_as_the_same_ledger():
    led = L.compute_ledger(three_incarnations().lines, L.Prices(0.5, 2.0, 4))
    assert L.Ledger.from_dict(json.loads(json.dumps(led.to_dict()))) == led
    with pytest.raises(ValueError, match="not a ledger document"):
        L.Ledger.from_dict({"version": 1})


def test_a_run_still_going_with_a_torn_last_line(tmp_path):
    run = FakeRun()
    run.start(2, None, 0, load_s=1.0)
    run.steps(1, 30, 0.5, every=10)
    path = run.write(str(tmp_path / "metrics.jsonl"), torn_tail=True)
    led = L.compute_ledger(read_records(path))
    assert led.state == "in progress" and led.last_step == 30
    assert led.steps == L.StepCounts(useful=30, lost=0)


def test_a_step_logged_again_without_a_start_counts_as_lost():
    run = FakeRun()
    run.start(1, None, 0)
    run.steps(1, 10, 1.0, every=100)
    run.steps(8, 12, 1.0, every=100)  # another writer redid 8..10 without a start line
    led = L.compute_ledger(run.lines)
    assert led.steps == L.StepCounts(useful=12, lost=3)


def test_empty_input_gives_an_empty_ledger():
    led = L.compute_ledger([])
    assert led.wall_s == 0.0 and led.goodput is None and led.incarnations == []


def test_write_and_read_ledger_beside_checkpoints(tmp_path):
    metrics = three_incarnations().write(str(tmp_path / "metrics.jsonl"))
    uri = "file://" + str(tmp_path / "checkpoints")
    written = store.write_ledger(uri, metrics, L.Prices(0.5, 2.0))
    assert written is not None
    back = store.read_ledger(uri)
    assert back == written
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if ".tmp" in p]
    assert store.read_ledger("file://" + str(tmp_path / "nowhere")) is None


def test_a_ledger_json_that_is_not_a_ledger_is_a_value_error(tmp_path):
    (tmp_path / store.LEDGER_FILE).write_text('{"version": 1}')
    with pytest.raises(ValueError):
        store.read_ledger(str(tmp_path))
    (tmp_path / store.LEDGER_FILE).write_text('{"vers')
    with pytest.raises(ValueError):
        store.read_ledger(str(tmp_path))


def test_write_ledger_never_raises(tmp_path, caplog):
    assert store.write_ledger("file://" + str(tmp_path), str(tmp_path / "missing.jsonl")) is None
    assert "ledger not written" in caplog.text
    metrics = three_incarnations().write(str(tmp_path / "metrics.jsonl"))
    assert store.LedgerWriter("nosuchstore://bucket/run", metrics).write() is None
    assert "nosuchstore://bucket/run" in caplog.text


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="elastic-train")
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_report_on_a_run_dir_prints_the_table_and_draws_a_plot(tmp_path, capsys):
    three_incarnations().write(str(tmp_path / "metrics.jsonl"))
    assert _report(["report", str(tmp_path), "--spot-price", "1.2",
                    "--on-demand-price", "4.0"]) == 0
    out = capsys.readouterr().out
    assert "state: done" in out and "goodput 0.153" in out
    assert "recomputed (lost) steps (22 steps)" in out
    assert "waiting for capacity" in out and "180.0" in out
    assert "cost at spot $1.2/node-hour" in out and "on-demand at $4/node-hour" in out
    png = tmp_path / "ledger.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_reads_ledger_json_from_a_checkpoint_uri(tmp_path, capsys):
    metrics = three_incarnations().write(str(tmp_path / "metrics.jsonl"))
    uri = "file://" + str(tmp_path / "ckpt")
    store.write_ledger(uri, metrics, L.Prices(spot_per_node_hour=2.0))
    plot = tmp_path / "p.png"
    assert _report(["report", uri, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "cost at spot $2/node-hour" in out and plot.exists()
    assert _report(["report", uri, "--json", "--no-plot", "--spot-price", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prices"]["spot_per_node_hour"] == 4.0


def test_report_on_nothing_fails_with_a_message(tmp_path, capsys):
    assert _report(["report", str(tmp_path / "none")]) == 1
    assert "no metrics.jsonl or ledger.json" in capsys.readouterr().err


def test_ledger_writer_rewrites_on_commits_at_most_so_often(tmp_path):
    run = three_incarnations()
    metrics = str(tmp_path / "metrics.jsonl")
    uri = "file://" + str(tmp_path / "ckpt")
    writer = store.LedgerWriter(uri, metrics, L.Prices(1.0), min_interval_s=3600)
    run.write(metrics)
    writer.on_event({"event": Event.SAVE_FAILED, "step": 20})
    assert store.read_ledger(uri) is None
    writer.on_event({"event": Event.COMMIT, "step": 20})
    first = store.read_ledger(uri)
    assert first is not None
    writes = writer.writes
    writer.on_event({"event": Event.COMMIT, "step": 40})  # within min_interval_s: skipped
    assert writer.writes == writes
    assert writer.write() is not None and writer.writes == writes + 1


def test_elastic_train_report_is_registered(tmp_path, capsys):
    from elastic_train.cli import main

    three_incarnations().write(str(tmp_path / "metrics.jsonl"))
    assert main(["report", str(tmp_path), "--no-plot"]) == 0
    assert "where the time went" in capsys.readouterr().out
