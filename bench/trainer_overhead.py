"""Steps/s of the elastic trainer as it ships (checkpointing off) vs a minimal plain FSDP2 loop
of the same model, measured in the same run, alternating the two to share the machine's noise.

    .venv/bin/python bench/trainer_overhead.py [--model tiny] [--nproc 2] [--steps 60] [--rounds 3]
        [--micro-batch 0]

`--micro-batch N` turns gradient accumulation on in both (N samples per rank per forward).

Ours runs the way a SkyPilot node runs it: `python -m elastic_train.node.launch` under the
environment SkyPilot sets for a one-node cluster (so: the c10d-fast rendezvous and its store,
the prefork server, the hang watchdog, the notice watcher, the node's worker entry). The plain
loop runs under `torchrun --standalone` with gloo. Both on CPU. The first 10 steps of every run
are warm-up and not counted. Ends with one JSON line: median step times and `ratio` = ours
steps/s / plain. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
WARMUP = 10


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(model: str, nproc: int, steps: int, batch: int, seq_len: int, micro: int
         ) -> list[float]:
    """One run through the shipped node launcher, as a one-node SkyPilot cluster."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        train_args = [f"--run.dir={run_dir}", f"--model={model}", f"--steps={steps}",
                      "--checkpoint.every=0", f"--data.batch_size={batch}",
                      f"--data.seq_len={seq_len}", f"--data.micro_batch={micro}",
                      "--run.log_every=1000"]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NODE_RANK": "0",
               "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NUM_GPUS_PER_NODE": str(nproc),
               "SKYPILOT_TASK_ID": f"bench-overhead-{os.getpid()}",
               "BUCKET": "file://" + str(Path(tmp) / "bucket"),
               "RDZV_PORT": str(free_port()),
               "ELASTIC_TRAIN_NOTICE_FILE": str(Path(tmp) / "notice"),
               "TRAIN_ARGS": shlex.join(train_args)}
        cmd = [sys.executable, "-m", "elastic_train.node.launch"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-3000:]}")
        lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return [r["step_time_s"] for r in lines if "step" in r and "event" not in r]


def plain(model: str, nproc: int, steps: int, batch: int, seq_len: int, micro: int
          ) -> list[float]:
    proc = torchrun(nproc, str(HERE / "plain_fsdp_loop.py"), model, str(steps), str(batch),
                    str(seq_len), str(micro))
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_times"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=0, help="samples per rank per forward")
    a = p.parse_args()
    shape = (a.model, a.nproc, a.steps, a.batch, a.seq_len, a.micro_batch)
    ours_t, plain_t = [], []
    for r in range(a.rounds):
        ours_t += ours(*shape)[WARMUP:]
        plain_t += plain(*shape)[WARMUP:]
        print(f"round {r + 1}/{a.rounds}: ours {statistics.median(ours_t) * 1e3:.1f} ms/step, "
              f"plain {statistics.median(plain_t) * 1e3:.1f} ms/step", flush=True)
    ours_s, plain_s = statistics.median(ours_t), statistics.median(plain_t)
    print(json.dumps({
        "bench": "trainer_overhead", "model": a.model, "nproc": a.nproc,
        "micro_batch": a.micro_batch,
        "ours_step_s": round(ours_s, 5), "plain_step_s": round(plain_s, 5),
        "ours_steps_per_s": round(1 / ours_s, 3), "plain_steps_per_s": round(1 / plain_s, 3),
        "ratio": round(plain_s / ours_s, 3), "target": 0.95,
    }))


if __name__ == "__main__":
    main()
