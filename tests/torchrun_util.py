"""Run the real trainer under a real torchrun, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def train(run_dir: Path, nproc: int, *overrides: str, timeout: float = 240,
          check: bool = True, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=nproc -m elastic_train.train --run.dir=...`;
    `pythonpath`: a directory the workers also import from (a spec's package)."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}",
           "-m", "elastic_train.train", f"--run.dir={run_dir}", "--run.log_every=5", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath),
                                                          env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def steps(run_dir: Path) -> list[dict]:
    """The step lines of metrics.jsonl, in the order they were written."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)

