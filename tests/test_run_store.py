"""The run lives in its bucket: metrics segments that every relaunch continues, the ledger and
`elastic-train report RUN_URI` over the whole history, the final weights under the run URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_util import final_weights, train

from checkpointing.storage import Storage
from elastic_train.cli import main
from elastic_train.events import Event
from elastic_train.goodput import store as ledger_store
from elastic_train.metrics import MetricsLog, is_step, validate_record
from elastic_train.model import GPT, config_for
from elastic_train.run_store import FINAL_WEIGHTS, METRICS_DIR, RunStore, SegmentSink

SHAPE = ["--data.batch_size=4", "--data.seq_len=32", "--checkpoint.every=3"]


def _lines(n: int, first: int = 1, t0: float = 1000.0) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "time": t0 + s} for s in range(first, first + n)]


def test_every_writer_adds_segments_and_readers_merge_them_in_order(s3) -> None:
    uri = s3.url("run")
    first = SegmentSink(RunStore(uri, s3.storage_options), flush_s=3600)
    for r in _lines(3):
        first.add(r)
    assert first.flush()
    # Readable while the run trains: the flushed lines are there before the writer closes.
    assert [r["step"] for r in RunStore(uri, s3.storage_options).records()] == [1, 2, 3]
    for r in _lines(2, first=4):
        first.add(r)
    first.close()
    # A relaunch (a new process, maybe on another node) continues; nothing is rewritten.
    before = RunStore(uri, s3.storage_options).segment_names()
    second = SegmentSink(RunStore(uri, s3.storage_options), flush_s=3600)
    for r in _lines(3, first=6):
        second.add(r)
    second.close()
    reader = RunStore(uri, s3.storage_options)
    names = reader.segment_names()
    assert names[:len(before)] == before and len(names) == len(before) + 1
    assert [r["step"] for r in reader.records()] == list(range(1, 9))
    assert first.writer != second.writer and first.added == 5 and second.segments == 1


def test_a_commit_is_flushed_without_waiting_for_the_interval(s3) -> None:
    uri = s3.url("run")
    seen: list[list[dict]] = []
    sink = SegmentSink(RunStore(uri, s3.storage_options), flush_s=3600, consumers=[seen.append])
    sink.add({"step": 1, "loss": 1.0, "time": 1.0})
    sink.add({"event": Event.COMMIT, "step": 1, "stall_s": 0.0, "commit_s": 0.1, "time": 2.0})
    # The commit woke the thread: wait on the consumer's batch, not on a clock.
    with sink._flushed:
        sink._flushed.wait_for(lambda: sink.segments >= 1, timeout=60)
    assert sink.segments == 1 and [len(b) for b in seen] == [2]
    sink.close()


def test_a_storage_outage_delays_a_segment_and_loses_nothing(s3_proxy) -> None:
    uri = s3_proxy.url("run")
    storage = Storage(uri, s3_proxy.storage_options, retry_timeout_s=0.5)
    sink = SegmentSink(RunStore(storage), flush_s=3600)
    s3_proxy.proxy.outage(3600)
    for r in _lines(4):
        sink.add(r)
    assert not sink.flush() and sink.failures >= 1
    s3_proxy.proxy.clear()
    for r in _lines(2, first=5):
        sink.add(r)
    assert sink.flush()
    sink.close()
    reader = RunStore(uri, s3_proxy.storage_options)
    assert [r["step"] for r in reader.records()] == [1, 2, 3, 4, 5, 6]
    assert len(reader.segment_names()) == 2, "the delayed segment kept its name"


def test_metrics_log_hands_each_stamped_line_to_its_sinks(tmp_path: Path) -> None:
    uri = "file://" + str(tmp_path / "ckpt")
    sink = SegmentSink(RunStore(uri), flush_s=3600)
    log = MetricsLog(str(tmp_path / "run" / "metrics.jsonl"), [sink])
    log.write({"step": 1, "loss": 2.0})
    log.event(Event.DONE, step=1)
    log.close()  # closes the sink: it flushes
    local = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert RunStore(uri).records() == local
    assert sink.added == 2 and sink.add_s > 0


def test_report_on_a_uri_without_history_is_one_line(s3, capsys) -> None:
    assert main(["report", s3.url("nothing"), "--no-plot"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no metrics.jsonl or ledger.json or metrics/ segments" in err and "\n" not in err


# --- two clusters, one run URI ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """A run of 8 steps on 2 ranks, then "another cluster" (another run.dir, 1 rank) that
    continues the same run URI to 12, with TensorBoard on. File storage: the layout is the
    same on every fsspec backend (`test_every_writer_...` covers S3)."""
    root = tmp_path_factory.mktemp("two-clusters")
    uri = "file://" + str(root / "bucket" / "run")
    a, b = root / "cluster-a", root / "cluster-b"
    common = [f"--checkpoint.uri={uri}", "--run.tensorboard=true", "--run.flush_s=0.5", *SHAPE]
    train(a, 2, "--steps=8", *common)
    train(b, 1, "--steps=12", *common)
    return uri, a, b


def test_two_clusters_leave_one_continuous_history_under_the_run_uri(two_clusters) -> None:
    uri, a, b = two_clusters
    history = RunStore(uri).records()
    steps = [int(r["step"]) for r in history if is_step(r)]
    assert steps == list(range(1, 13)), "every step once, in order, from both clusters"
    for record in history:
        validate_record(record)
    starts = [r for r in history if r.get("event") == Event.START]
    assert [(s["world_size"], s["restored_step"]) for s in starts] == [(2, None), (1, 8)]
    # Each cluster's own disk holds only its part.
    assert not (b / "metrics.jsonl").read_text().count('"step": 3,')
    sinks = [r for r in history if r.get("event") == Event.DONE]
    assert all(r["sink_lines"] > 0 and r["sink_add_s"] >= 0 for r in sinks)


def test_the_ledger_and_report_cover_both_clusters(two_clusters, tmp_path: Path,
                                                   capsys) -> None:
    uri, _, _ = two_clusters
    kept = ledger_store.read_ledger(uri)
    assert kept is not None and kept.state == "done" and kept.last_step == 12
    assert len(kept.incarnations) == 2 and kept.steps.useful == 12 and kept.steps.lost == 0
    assert main(["report", uri, "--json", "--no-plot"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["last_step"] == 12 and len(doc["incarnations"]) == 2
    assert main(["report", uri, "--plot", str(tmp_path / "l.png")]) == 0
    table = capsys.readouterr().out
    assert "state: done" in table and (tmp_path / "l.png").exists()
    assert "history: 2 incarnation(s)" in table
    assert "world 2, from scratch: steps 1-8" in table
    assert "world 1, from step 8: steps 9-12" in table


def test_tensorboard_reader_shows_every_step_once(two_clusters, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri, _, _ = two_clusters
    copy = tmp_path / "tb"
    storage = Storage(uri)
    for name in storage.list_files("tensorboard"):  # a downloaded copy, as a user would
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(storage.read_bytes(f"tensorboard/{name}"))
    acc = EventAccumulator(str(copy))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    history = {int(r["step"]): r["loss"] for r in RunStore(uri).records() if is_step(r)}
    assert all(e.value == pytest.approx(history[e.step], rel=1e-6) for e in loss)
    assert "checkpoint/stall_s" in acc.Tags()["scalars"]


def test_final_weights_under_the_run_uri_equal_the_trainers_and_the_export(
        two_clusters, tmp_path: Path) -> None:
    uri, _, b = two_clusters
    final = final_weights(b)
    uploaded = RunStore(uri).read_final_weights()
    assert Storage(uri).exists(FINAL_WEIGHTS)
    out = tmp_path / "model.safetensors"
    assert main(["export", uri, "--out", str(out)]) == 0
    exported = load_file(out)
    model = GPT(config_for("tiny", 32, 256))
    model.load_state_dict(uploaded)  # strict: a fresh model takes them as they are
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]) and torch.equal(exported[name], final[name])


def test_layout_names_sort_by_time(two_clusters) -> None:
    uri, _, _ = two_clusters
    names = RunStore(uri).segment_names()
    firsts = [json.loads(Storage(uri).read_bytes(f"{METRICS_DIR}/{n}").split(b"\n")[0])["time"]
              for n in names]
    assert firsts == sorted(firsts)


# --- a chaos run whose rank 0 moves, then another cluster --------------------------------------

MOVING_RANK0 = {
    "name": "rank0-moves", "nodes": 2, "min_nodes": 1, "max_nodes": 2, "storage": "file",
    "seed": 5,
    "train": {"model": "tiny", "steps": 16, "checkpoint.every": 4, "data.batch_size": 4,
              "data.seq_len": 32, "run.tensorboard": True, "run.flush_s": 0.5},
    # Node 0 holds rank 0: killing it (SIGKILL, no notice) makes node 1's worker rank 0.
    "faults": [{"kind": "kill_node", "node": 0, "at_step": 10}],
}


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_rank0_moving_and_another_cluster_keep_one_history(tmp_path: Path) -> None:
    from chaos import scenario as scenario_lib
    from chaos.backends import prepared_data
    from chaos.harness import Options, run_scenario

    cache = tmp_path / "cache"
    rep = run_scenario(scenario_lib.from_dict(MOVING_RANK0, "test"),
                       Options(out=tmp_path / "chaos", cache=cache, timeout_s=300,
                               log=lambda message: None))
    failed = {k: v["detail"] for k, v in rep["invariants"].items() if not v["ok"]}
    assert not failed and rep["faults_not_fired"] == [], failed
    uri = rep["run_uri"]
    # "Another cluster": its own run.dir, the same run URI, after the first stopped.
    other = tmp_path / "other-cluster"
    train(other, 1, f"--checkpoint.uri={uri}", "--steps=24", f"--data.uri={prepared_data(cache)}",
          "--run.tensorboard=true", *SHAPE)

    history = RunStore(uri).records()
    for record in history:
        validate_record(record)
    steps = [int(r["step"]) for r in history if is_step(r)]
    assert sorted(set(steps)) == list(range(1, 25)), "every step is in the history"
    starts = [(r["world_size"], r["restored_step"]) for r in history
              if r.get("event") == Event.START]
    assert starts[0] == (2, None) and starts[-1] == (1, 16)
    moved = [restored for world, restored in starts[1:-1] if world == 1]
    assert moved and moved[0] is not None, \
        "after node 0 died, the worker on node 1 (now rank 0) resumed from a commit"
    # Steps written twice are only those a restart rolled back (after its commit).
    assert all(moved[0] < s <= 16 for s in steps if steps.count(s) > 1)

    kept = ledger_store.read_ledger(uri)
    assert kept is not None and kept.state == "done" and kept.last_step == 24
    assert kept.steps.useful == 24 and len(kept.incarnations) >= 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copy = tmp_path / "tb"
    storage = Storage(uri)
    for name in storage.list_files("tensorboard"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(storage.read_bytes(f"tensorboard/{name}"))
    acc = EventAccumulator(str(copy))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 25))

    uploaded = RunStore(uri).read_final_weights()
    final = final_weights(other)
    assert set(uploaded) == set(final)
    assert all(torch.equal(uploaded[k], final[k]) for k in final)
