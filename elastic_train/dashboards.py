"""Dashboards people already use, fed from the run's metrics segments (both off by default).

- `TensorBoardEvents` (`run.tensorboard = true`, extra `tensorboard`): each batch of lines the
  segment sink flushes becomes one new event file object in `{uri}/tensorboard/`, named so that
  a listing sorts them by time. TensorBoard merges the files of a directory, so
  `tensorboard --logdir s3://bucket/run/tensorboard` and a local copy of it both show the whole
  run. Each (re)start writes TensorBoard's own restart marker (`SessionLog.START` at the restored
  step + 1), so its reader drops the steps a restart rolled back and shows every step once.
- `WandbRun` (`run.wandb = true`, extra `wandb`): a Weights & Biases run whose id is the run's
  name, resumed with `resume="allow"`, so every relaunch continues the same chart. Steps a
  restart rolled back are not logged again (W&B keeps a step's first values).

What happens on failure: both run on the segment sink's thread after a segment is written; what
they raise is logged there and never reaches the step loop. An event file that cannot be written
is skipped (its lines are in the metrics segments). A missing package is a `ConfigError` when
the trainer starts, naming the extra to install.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_train.config import Config, ConfigError
from elastic_train.events import Event
from elastic_train.metrics import Record, is_step
from elastic_train.run_store import TENSORBOARD_DIR, RunStore, new_writer_id, segment_name

log = logging.getLogger(__name__)

NOT_SCALARS = ("step", "time", "restart", "event")
"""Numeric fields of a step line that are not plotted (the x axis, the clock, a counter)."""


def step_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The plottable values of a step line: its top-level numbers but the step and the clock."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_packages(config: Config) -> None:
    """Raise ConfigError naming the extra to install when a dashboard asked for in `config.run`
    is missing its package. Call it on every rank, so that all ranks refuse the config alike."""
    import importlib.util

    for module, wanted in (("tensorboard", config.run.tensorboard), ("wandb", config.run.wandb)):
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.{module}=true needs the {module} package: "
                              f"pip install 'elastic-train[{module}]'")


class TensorBoardEvents:
    """Writes each batch as a new TensorBoard event file under `{store}/tensorboard/`."""

    def __init__(self, store: RunStore) -> None:
        self.storage = store.storage.child(TENSORBOARD_DIR)
        self.writer = new_writer_id()
        self.files = 0
        """Event files written (counted, for tests)."""

    def __call__(self, batch: Sequence[Record]) -> None:
        body = encode_events(batch)
        if body is None:
            return
        name = "events.out.tfevents." + segment_name(batch[0]["time"], self.writer, self.files,
                                                     suffix="").replace("-", ".")
        self.storage.write_bytes(name, body)
        self.files += 1


def encode_events(batch: Sequence[Record]) -> bytes | None:
    """The bytes of one event file holding `batch` (None when nothing in it is plotted): the
    file version, a restart marker per `start` line, a scalar per number of each step line and
    each commit's stall."""
    from tensorboard.compat.proto.event_pb2 import Event as TbEvent
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    events: list[TbEvent] = []
    for r in batch:
        t = float(r["time"])
        if r.get("event") == Event.START:
            step = int(r.get("restored_step") or 0) + 1
            events.append(TbEvent(wall_time=t, step=step,
                                  session_log=SessionLog(status=SessionLog.START)))
        elif r.get("event") == Event.COMMIT:
            events.append(TbEvent(wall_time=t, step=int(r["step"]), summary=Summary(value=[
                Summary.Value(tag="checkpoint/stall_s", simple_value=float(r.get("stall_s", 0))),
                Summary.Value(tag="checkpoint/commit_s", simple_value=float(r.get("commit_s", 0))),
            ])))
        elif is_step(r):
            values = [Summary.Value(tag=f"train/{k}", simple_value=v)
                      for k, v in step_scalars(r).items()]
            events.append(TbEvent(wall_time=t, step=int(r["step"]), summary=Summary(value=values)))
    if not events:
        return None
    out = io.BytesIO()
    writer = RecordWriter(out)
    writer.write(TbEvent(wall_time=float(batch[0]["time"]),
                         file_version="brain.Event:2").SerializeToString())
    for event in events:
        writer.write(event.SerializeToString())
    return out.getvalue()


class WandbRun:
    """Logs step lines to a W&B run with id `run_id`, resumed if it exists (`resume="allow"`).

    `wandb.init` runs on the first batch, on the sink's thread, so the trainer never waits for
    it. W&B reads its own settings from the environment (WANDB_API_KEY, WANDB_MODE=offline,
    WANDB_DIR, ...)."""

    def __init__(self, project: str, run_id: str, directory: str,
                 config: Mapping[str, Any] | None = None) -> None:
        self.project, self.run_id, self.directory = project, run_id, directory
        self.config = dict(config or {})
        self.run: Any = None
        self.last_step = 0

    def __call__(self, batch: Sequence[Record]) -> None:
        steps = [r for r in batch if is_step(r) and int(r["step"]) > self.last_step]
        if not steps:
            return
        if self.run is None:
            import wandb

            os.makedirs(self.directory, exist_ok=True)
            self.run = wandb.init(project=self.project, id=self.run_id, name=self.run_id,
                                  resume="allow", dir=self.directory, config=self.config)
            # After a relaunch W&B resumes at the step after the last it holds.
            self.last_step = max(self.last_step, int(self.run.step or 0) - 1)
        for r in steps:
            step = int(r["step"])
            if step > self.last_step:
                self.run.log(step_scalars(r), step=step)
                self.last_step = step

    def close(self) -> None:
        """Finish the run and wait until W&B has written (or sent) all of it."""
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            # finish() may return before W&B's service has written the last records; the
            # teardown waits for it (this process's only W&B run is over).
            wandb.teardown()


def run_name(config: Config, run_uri: str) -> str:
    """`run.name`, else one made from the run URI (`s3://b/runs/x` -> `b-runs-x`): the same on
    every relaunch, so W&B resumes the same run. At most 64 characters of [A-Za-z0-9_.-]."""
    name = config.run.name or run_uri.split("://", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[-64:] or "run"


def build_dashboards(config: Config, store: RunStore) -> list[Any]:
    """The dashboards `config.run` asks for, as consumers of the run's segment sink. Raises
    ConfigError when one is asked for and its package is missing."""
    check_packages(config)
    dashboards: list[Any] = []
    if config.run.tensorboard:
        dashboards.append(TensorBoardEvents(store))
    if config.run.wandb:
        dashboards.append(WandbRun(config.run.wandb_project, run_name(config, store.url),
                                   posixpath.join(config.run.dir, "wandb"),
                                   {"model": config.model, "steps": config.steps,
                                    "seed": config.seed, "digest": config.digest()}))
    return dashboards
