"""TensorBoard event files under the run URI, read back with TensorBoard's own reader, and the
Weights & Biases run in offline mode: one chart per run name, continued by every relaunch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from checkpointing.storage import Storage
from elastic_train.config import Config, ConfigError
from elastic_train.dashboards import (
    TensorBoardEvents,
    WandbRun,
    build_dashboards,
    check_packages,
    run_name,
)
from elastic_train.events import Event
from elastic_train.run_store import TENSORBOARD_DIR, RunStore


def _start(t: float, restored: int | None, world: int = 2) -> dict:
    return {"event": Event.START, "time": t, "world_size": world, "restored_step": restored,
            "restart": 0, "startup_s": {}}


def _steps(first: int, last: int, t0: float, loss_offset: float = 0.0) -> list[dict]:
    return [{"step": s, "loss": 10.0 - s + loss_offset, "lr": 0.01, "world_size": 2,
             "tokens_per_s": 100.0, "step_time_s": 0.5, "restart": 0, "batch_digest": "x",
             "time": t0 + s} for s in range(first, last + 1)]


def _download(storage: Storage, to: Path) -> Path:
    for name in storage.list_files(TENSORBOARD_DIR):
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        (to / name).write_bytes(storage.read_bytes(f"{TENSORBOARD_DIR}/{name}"))
    return to


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_restart_replaces_the_rolled_back_steps_in_tensorboards_reader(s3, tmp_path) -> None:
    """Steps 5..6 ran, were lost (restore from 4), and ran again with other values: the
    reader shows 1..7 once each, with the values of the second run."""
    store = RunStore(s3.url("run"), s3.storage_options)
    events = TensorBoardEvents(store)
    events([_start(100.0, None), *_steps(1, 6, 100.0)])
    events([{"event": Event.COMMIT, "step": 4, "stall_s": 0.2, "commit_s": 1.0, "time": 105.0}])
    events([_start(200.0, 4, world=1), *_steps(5, 7, 200.0, loss_offset=0.5)])
    assert events.files == 3
    logdir = _download(store.storage, tmp_path / "tb")
    loss = _scalars(logdir, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 8))
    assert dict(loss)[6] == pytest.approx(4.5) and dict(loss)[4] == pytest.approx(6.0)
    assert _scalars(logdir, "checkpoint/stall_s") == [(4, pytest.approx(0.2))]
    assert [s for s, _ in _scalars(logdir, "train/world_size")] == list(range(1, 8))


def test_a_batch_with_nothing_to_plot_writes_no_file(tmp_path) -> None:
    events = TensorBoardEvents(RunStore(str(tmp_path)))
    events([{"event": Event.NOTICE, "step": 3, "deadline_s": 5, "source": "x", "time": 1.0}])
    assert events.files == 0 and not (tmp_path / TENSORBOARD_DIR).exists()


def _wandb_history(run_dir: Path) -> dict[str, list[dict[str, str]]]:
    """{offline run dir/file: its history rows}, read from W&B's own offline files, in the
    order the runs began."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    found: dict[str, list[dict[str, str]]] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        store = DataStore()
        store.open_for_scan(str(path))
        rows = found.setdefault(f"{path.parent.name}/{path.name}", [])
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json
                             for i in record.history.item})
    return found


def test_wandb_resumes_the_run_named_by_the_run_and_logs_each_step_once(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    directory = str(tmp_path / "run")
    first = WandbRun("proj", "bucket-runs-x", directory, {"steps": 7})
    first([_start(100.0, None), *_steps(1, 4, 100.0)])
    first(_steps(3, 5, 100.0))  # steps 3..4 again after a rollback in this process
    assert first.run.id == "bucket-runs-x" and first.run.settings.resume == "allow"
    first.close()
    relaunch = WandbRun("proj", "bucket-runs-x", directory)
    relaunch([_start(200.0, 4), *_steps(5, 7, 200.0)])
    relaunch.close()
    histories = _wandb_history(tmp_path / "run")
    assert len(histories) == 2 and all(k.endswith("/run-bucket-runs-x.wandb")
                                       for k in histories)
    first_rows, relaunch_rows = histories.values()
    assert [int(r["_step"]) for r in first_rows] == [1, 2, 3, 4, 5]
    # Offline, W&B cannot see the earlier run's last step, so the relaunch logs from its
    # restore; online, W&B resumes the run at step 6 and keeps step 5's first values.
    assert [int(r["_step"]) for r in relaunch_rows] == [5, 6, 7]
    rows = first_rows + relaunch_rows
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert not {"time", "step", "restart"} & set(rows[0])


def test_both_dashboards_are_off_by_default_and_a_missing_package_is_one_line(
        tmp_path, monkeypatch) -> None:
    config = Config()
    assert build_dashboards(config, RunStore(str(tmp_path))) == []
    config.run.wandb = True
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"run.wandb=true needs the wandb package: "
                                          r"pip install 'elastic-train\[wandb\]'"):
        check_packages(config)


def test_the_run_name_is_the_same_on_every_relaunch() -> None:
    config = Config()
    assert run_name(config, "s3://bucket/runs/gpt-base") == "bucket-runs-gpt-base"
    config.run.name = "my run/1"
    assert run_name(config, "s3://bucket/runs/gpt-base") == "my-run-1"
