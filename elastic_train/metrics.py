"""metrics.jsonl (one JSON line per step or event) and the progress line rank 0 prints."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any


class MetricsLog:
    """Appends JSON lines to `path`. Thread-safe: checkpoint events arrive from a background
    thread. Each line is flushed at once, so a killed worker loses at most the line it was
    writing, and readers (the chaos harness) may tail the file while the run goes on."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._file = None
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({**record, "time": record.get("time", time.time())})
        with self._lock:
            self._file.write(line + "\n")

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, **fields})

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


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
