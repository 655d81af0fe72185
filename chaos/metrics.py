"""Reading the trainer's metrics.jsonl while it is written, and the facts derived from it.

The trainer's rank 0 appends one JSON line per step or event (`elastic_train.metrics`; their
shapes: elastic_train/schemas/metrics.schema.json). A killed rank 0 can leave a torn last line;
the tailer keeps an unterminated tail until its newline arrives and skips a line that is not a
JSON object (counted in `bad_lines`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic_train.events import Event
from elastic_train.metrics import Record, events, is_step, parse_line

__all__ = ["Lineage", "MetricsTail", "Record", "events", "is_step", "read_all", "step_records"]


class MetricsTail:
    """Incremental reader of a JSON-lines file that may not exist yet."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[Record] = []
        self.bad_lines = 0
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[Record]:
        """New complete records since the last call (also appended to `records`)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        new: list[Record] = []
        for line in lines:
            record = parse_line(line)
            if record is not None:
                new.append(record)
            elif line.strip():
                # A writer killed mid-line, then the next writer appended after it.
                self.bad_lines += 1
        self.records.extend(new)
        return new


def read_all(path: str | Path) -> list[Record]:
    tail = MetricsTail(path)
    tail.poll()
    return tail.records


@dataclass
class Lineage:
    """The steps that led to the final weights: rolled back at every `start` to its
    `restored_step`, extended by every step line.

    `problems` lists what breaks exactly-once: a step line that does not extend the lineage by one
    (a skipped or repeated step without a restore in between), or a restart that restored a step
    beyond the lineage."""

    steps: list[Record | None] = field(default_factory=list)
    """steps[s - 1]: the step line of step s in the current lineage (None: never reported)."""
    problems: list[str] = field(default_factory=list)
    restores: list[int | None] = field(default_factory=list)
    """restored_step of every start, in order."""

    @classmethod
    def from_records(cls, records: list[Record]) -> Lineage:
        lineage = cls()
        for r in records:
            lineage.add(r)
        return lineage

    def add(self, r: Record) -> None:
        if r.get("event") == Event.START:
            restored = r.get("restored_step")
            self.restores.append(restored)
            keep = int(restored or 0)
            if keep > len(self.steps):
                self.problems.append(
                    f"a restart restored step {keep} but only {len(self.steps)} steps were run")
                keep = len(self.steps)
            del self.steps[keep:]
        elif is_step(r):
            step = int(r["step"])
            if step != len(self.steps) + 1:
                self.problems.append(
                    f"step {step} reported after step {len(self.steps)} without a restart")
                if step <= len(self.steps):
                    del self.steps[step - 1:]
                else:
                    self.steps.extend([None] * (step - 1 - len(self.steps)))
            self.steps.append(r)

    def column(self, name: str) -> list[Any]:
        """`name` of every step of the lineage, in step order (None where absent)."""
        return [None if r is None else r.get(name) for r in self.steps]

    @property
    def final_step(self) -> int:
        return len(self.steps)


def step_records(records: list[Record]) -> list[Record]:
    return [r for r in records if is_step(r)]

