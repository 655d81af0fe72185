"""metrics.jsonl against its packaged schema: one branch per event of the vocabulary, lines the
trainer really writes are accepted, broken lines are refused with a message naming the fault."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_util import train

from elastic_train.events import Event
from elastic_train.metrics import (
    STEP,
    InvalidRecord,
    MetricsLog,
    metrics_schema,
    read_records,
    schema_branches,
    validate_record,
)

STEP_LINE = {"step": 3, "loss": 4.2, "lr": 1e-3, "world_size": 2, "batch_digest": "ab12",
             "tokens_per_s": 900.0, "step_time_s": 0.4, "time": 1_795_000_000.0, "restart": 0}
"""A step line as the step loop writes it."""

EVENT_FIELDS: dict[Event, dict] = {
    Event.START: {"world_size": 2, "restored_step": None, "restart": 0,
                  "startup_s": {"trainer": 0.1, "process_group": 0.2, "model": 0.3,
                                "restore": 0.0}},
    Event.COMMIT: {"step": 4, "stall_s": 0.01, "commit_s": 0.3},
    Event.SAVE_FAILED: {"step": 6, "error": "write s3://b/run/step_00000006: timed out"},
    Event.FALLBACK: {"step": 6, "to_step": 4, "file": "s3://b/run/step_00000006/__0_0.distcp",
                     "reason": "s3://b/run/step_00000006/__0_0.distcp: 10 bytes, COMMIT.json "
                               "records 12"},
    Event.DATA_CHANGED: {"step": 6, "changed": {"seed": {"checkpoint": 1, "now": 2}}},
    Event.NOTICE: {"step": 7, "deadline_s": 30.0, "source": "file"},
    Event.LEFT: {"step": 7},
    Event.DONE: {"step": 8},
}
"""The fields the trainer gives each event (a test fails when an event is missing here)."""


def test_every_event_has_a_schema_branch_and_every_branch_is_an_event_or_the_step() -> None:
    branches = schema_branches()
    assert set(branches) == {STEP} | {e.value for e in Event}
    assert set(EVENT_FIELDS) == set(Event)
    for event in Event:
        assert branches[event.value]["properties"]["event"] == {"const": event.value}
    assert branches[STEP]["not"] == {"required": ["event"]}


def test_the_schema_is_a_valid_json_schema() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(metrics_schema())


def test_lines_written_as_the_trainer_writes_them_validate(tmp_path: Path) -> None:
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write(STEP_LINE)
    for event, fields in EVENT_FIELDS.items():
        log.event(event, **fields)
    log.event(Event.NOTICE, step=9, deadline_s=1.0, source=None)  # another rank had the notice
    log.close()
    records = read_records(str(tmp_path / "metrics.jsonl"))
    assert [r.get("event") for r in records] == [None, *Event, Event.NOTICE]
    for r in records:
        validate_record(r)


@pytest.mark.parametrize(("line", "message"), [
    ({**STEP_LINE, "event": "started"}, "unknown event 'started'"),
    ({"event": "step", "time": 1.0}, "unknown event 'step'"),
    ({"event": 3, "time": 1.0}, "unknown event 3"),
    ({"event": Event.COMMIT, "time": 1.0, "step": 4, "stall_s": 0.1}, "'commit_s' is a required"),
    ({k: v for k, v in STEP_LINE.items() if k != "loss"}, "step line: 'loss' is a required"),
    ({**STEP_LINE, "world_size": "2"}, "step line: world_size: '2' is not of type 'integer'"),
    ({**STEP_LINE, "step": 0}, "step: 0 is less than the minimum of 1"),
    ({"event": Event.START, "time": 1.0, "world_size": 1, "restored_step": None, "restart": 0},
     "'startup_s' is a required"),
    ({"event": Event.DONE, "step": 8}, "done line: 'time' is a required"),
    ([1, 2], "a metrics line is a JSON object"),
])
def test_a_broken_line_is_refused_naming_what_is_wrong(line: object, message: str) -> None:
    with pytest.raises(InvalidRecord) as caught:
        validate_record(line)
    assert message in str(caught.value)


def test_every_line_of_a_real_run_validates(tmp_path: Path) -> None:
    """One rank, a few steps, two commits: the start, step, commit and done lines as written."""
    train(tmp_path, 1, "--steps=4", "--checkpoint.every=2", "--data.batch_size=4",
          "--data.seq_len=32", "--optim.warmup_steps=1")
    records = read_records(str(tmp_path / "metrics.jsonl"))
    kinds = {r.get("event", STEP) for r in records}
    assert kinds == {STEP, Event.START, Event.COMMIT, Event.DONE}, kinds
    for r in records:
        validate_record(r)
