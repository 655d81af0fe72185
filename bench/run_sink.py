"""What the step loop pays for keeping the run's history under its URI: the time rank 0's
`MetricsLog.write` spends per line with the segment sink (`elastic_train.run_store`) against the
local metrics.jsonl alone, while the sink's thread writes segments to S3 (a local moto server)
or a file:// URI.

    .venv/bin/python bench/run_sink.py [--storage s3|file --lines 20000 --every-s 0.001
                                        --flush-s 0.5 --tensorboard]

Lines look like the trainer's step lines, written every `--every-s` seconds (a step's pace; 0:
back to back). Each `write` is timed with perf_counter; the sink's own counter (`add_s`) is
printed too. Prints one final JSON line: per-line mean, p99 and max in microseconds for both
variants, and how many segments (and TensorBoard files) the thread wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator

from elastic_train.metrics import MetricsLog
from elastic_train.run_store import RunStore, SegmentSink


@contextlib.contextmanager
def target(storage: str, tmp: str) -> Iterator[str]:
    """A run URI on `storage`: a moto S3 server on loopback, or a local directory."""
    if storage == "file":
        yield "file://" + os.path.join(tmp, "bucket", "run")
        return
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    from chaos.backends import environ
    from chaos.services import MotoS3Server

    with MotoS3Server() as server, environ(server.env(server.endpoint_url)):
        fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint_url,
                                    **{k: v for k, v in server.storage_options().items()
                                       if k in ("key", "secret")}}
        fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options()).mkdir(
            "bench-run")
        yield "s3://bench-run/run"


def line(step: int) -> dict:
    return {"step": step, "loss": 3.0 - step * 1e-4, "lr": 3e-3, "world_size": 2,
            "batch_digest": "0123456789abcdef", "tokens_per_s": 12345.6, "step_time_s": 0.01,
            "restart": 0}


def run(log: MetricsLog, lines: int, every_s: float) -> list[float]:
    """Seconds each `write` took."""
    took = []
    for step in range(1, lines + 1):
        t0 = time.perf_counter()
        log.write(line(step))
        took.append(time.perf_counter() - t0)
        if every_s:
            time.sleep(every_s)
    return took


def summary(took: list[float]) -> dict[str, float]:
    us = sorted(t * 1e6 for t in took)
    return {"mean_us": round(statistics.fmean(us), 2), "p99_us": round(us[int(len(us) * .99)], 2),
            "max_us": round(us[-1], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", choices=["s3", "file"], default="s3")
    p.add_argument("--lines", type=int, default=20000)
    p.add_argument("--every-s", type=float, default=0.001)
    p.add_argument("--flush-s", type=float, default=0.5)
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard files")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, target(args.storage, tmp) as uri:
        local = MetricsLog(os.path.join(tmp, "alone", "metrics.jsonl"))
        alone = run(local, args.lines, args.every_s)
        local.close()
        store = RunStore(uri)
        consumers = []
        if args.tensorboard:
            from elastic_train.dashboards import TensorBoardEvents

            consumers.append(TensorBoardEvents(store))
        sink = SegmentSink(store, args.flush_s, consumers)
        log = MetricsLog(os.path.join(tmp, "with-sink", "metrics.jsonl"), [sink])
        with_sink = run(log, args.lines, args.every_s)
        t0 = time.perf_counter()
        log.close()
        close_s = time.perf_counter() - t0
        history = len(RunStore(uri).records())
    print(json.dumps({
        "storage": args.storage, "lines": args.lines, "every_s": args.every_s,
        "flush_s": args.flush_s, "local_file_only": summary(alone),
        "with_sink": summary(with_sink),
        "sink_add_mean_us": round(sink.add_s / max(1, sink.added) * 1e6, 2),
        "segments": sink.segments, "tensorboard_files": sum(c.files for c in consumers),
        "close_flush_s": round(close_s, 3), "lines_in_history": history,
    }))


if __name__ == "__main__":
    main()
