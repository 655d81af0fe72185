"""metrics.jsonl: one JSON line per step or event, written by rank 0 and read by everything else.

The writer (`MetricsLog`), the progress line rank 0 prints, and what readers share: telling a step
line from an event line, reading a file that may still be written, and checking a line against
its schema (`elastic_train/schemas/metrics.schema.json`: a step line, or an event line of one of
`elastic_train.events.Event`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol

from elastic_train.events import Event

Record = dict[str, Any]
"""One parsed metrics line."""

STEP = "step"
"""The schema's name for a step line (it has no `"event"`)."""


class MetricsSink(Protocol):
    """Somewhere else each line goes (the run's segments under its URI: `run_store`)."""

    def add(self, record: Mapping[str, Any]) -> None:
        """Take one stamped line; must return at once (the step loop is waiting)."""

    def close(self) -> None:
        """Deliver what is left; must not raise."""


class MetricsLog:
    """Appends JSON lines to `path`, and hands each to `sinks`. Thread-safe: checkpoint events
    arrive from a background thread. Each line is flushed at once, so a killed worker loses at
    most the line it was writing, and readers (the chaos harness) may tail the file while the
    run goes on."""

    def __init__(self, path: str | None, sinks: Sequence[MetricsSink] = ()) -> None:
        self._lock = threading.Lock()
        self._file = None
        self.path = path
        self.sinks = list(sinks)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record`, stamped with `time` unless it has one. Does nothing once closed or
        without a path; raises OSError when the disk refuses the line."""
        if self._file is None:
            return
        stamped = {**record, "time": record.get("time", time.time())}
        line = json.dumps(stamped)
        with self._lock:
            self._file.write(line + "\n")
        for sink in self.sinks:
            sink.add(stamped)

    def event(self, name: Event, **fields: Any) -> None:
        """Append an event line: `{"event": name, **fields}` (the fields its schema asks for)."""
        self.write({"event": name, **fields})

    def close(self) -> None:
        """Close the file, then the sinks (each delivers what it holds)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        for sink in self.sinks:
            sink.close()


# --- reading ---------------------------------------------------------------------------------

def parse_line(line: str | bytes) -> Record | None:
    """The JSON object on `line`, or None when the line is blank, torn or not an object."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_records(path: str) -> list[Record]:
    """The records of a metrics.jsonl, in file order. Lines that do not parse (a torn last line)
    or carry no numeric `time` are skipped. Raises OSError when the file cannot be read."""
    with open(path, encoding="utf-8", errors="replace") as f:
        parsed = [parse_line(line) for line in f]
    return [r for r in parsed if r is not None and isinstance(r.get("time"), (int, float))]


def is_step(record: Mapping[str, Any]) -> bool:
    """A step line: it has a `step` and no `event`."""
    return "step" in record and "event" not in record


def events(records: Iterable[Record], name: Event) -> list[Record]:
    """The event lines named `name`, in order."""
    return [r for r in records if r.get("event") == name]


# --- the schema ------------------------------------------------------------------------------

class InvalidRecord(ValueError):
    """A metrics line that breaks `metrics.schema.json`; the message names the line's kind and
    the first thing wrong with it."""


@functools.cache
def metrics_schema() -> dict[str, Any]:
    """The packaged JSON schema of one metrics line. Raises OSError when the package was
    installed without it."""
    text = resources.files("elastic_train").joinpath("schemas", "metrics.schema.json")
    return json.loads(text.read_text(encoding="utf-8"))


def schema_branches() -> dict[str, dict[str, Any]]:
    """{kind: its schema} for every line the schema allows: `STEP` and one per event name, in
    the schema's order."""
    schema = metrics_schema()
    names = [branch["$ref"].rsplit("/", 1)[1] for branch in schema["oneOf"]]
    return {name: schema["$defs"][name] for name in names}


@functools.cache
def _validator(kind: str) -> Any:
    import jsonschema

    schema = metrics_schema()
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"})


def validate_record(record: Any) -> None:
    """Check one parsed metrics line against the schema. Raises InvalidRecord for anything but
    a step line or an event line of a known event with every field its kind requires."""
    if not isinstance(record, Mapping):
        raise InvalidRecord(f"a metrics line is a JSON object, not {type(record).__name__}")
    kind = record.get("event", STEP)
    if not isinstance(kind, str) or kind not in schema_branches() or \
            (kind == STEP and "event" in record):
        raise InvalidRecord(f"unknown event {kind!r} (known: "
                            f"{', '.join(k for k in schema_branches() if k != STEP)})")
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(kind).iter_errors(dict(record)))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise InvalidRecord(f"{kind} line: {where + ': ' if where else ''}{error.message}")


# --- what rank 0 prints ----------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float,
                  world_size: int, eta_s: float) -> str:
    return (f"step {step:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:>9,.0f} tok/s | world {world_size} | ETA {_duration(eta_s)}")


def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
