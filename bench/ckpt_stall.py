"""Training time lost per checkpoint save, async against sync, counting every cost: the time in
`save()` plus the slowdown of every training step that overlaps the background copy, checksum
and upload.

    .venv/bin/python bench/ckpt_stall.py [--dim 2048 --layers 24 --repeats 5 --window 8]
                                          [--pin] [--dir /tmp/x]

Single process (a world of one), file:// storage in a temporary directory, real training steps
(forward, backward, AdamW) of a ~100M-parameter MLP with its AdamW moments. Each repeat runs,
interleaved so the machine's drift hits every arm alike:

- `base`: `window` steps with no save: the step time of this repeat (their median);
- `sync`: a sync save, then `window` steps;
- `async` (staging "deferred") and `async_blocking` (staging "blocking"): an async save, then
  `window` steps (more if the save is still in flight: every overlapped step is counted).

Time lost by a save = (time in `save()`) + sum over the steps after it of (step time - base).
`lost_over_sync` = async lost / sync lost, both medians over repeats after the first (the first
async save allocates its staging buffers). `--pin` pins the training thread to one core and the
checkpoint's background threads to another (`os.sched_setaffinity`), as training would run
beside a GPU: the background work then competes for memory bandwidth, not for the core.
Prints one line per repeat, then one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState

TARGET_LOST_OVER_SYNC = 0.15


def build(dim: int, layers: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = model(batch).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


class Cores:
    """With `pin`, training on the first allowed core and the checkpoint's threads on another.

    Linux affinity is per thread and inherited by the threads a thread starts: `background()`
    moves the calling (training) thread to the background core while `save()` starts its
    threads, then moves it back."""

    def __init__(self, pin: bool) -> None:
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.pin = pin and len(allowed) >= 2
        if pin and not self.pin:
            raise SystemExit("--pin needs at least two usable cores (os.sched_getaffinity)")
        self.train_core = {allowed[0]} if self.pin else set()
        self.background_core = {allowed[1]} if self.pin else set()
        if self.pin:
            os.sched_setaffinity(0, self.train_core)

    @contextmanager
    def background(self) -> Iterator[None]:
        if not self.pin:
            yield
            return
        os.sched_setaffinity(0, self.background_core)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.train_core)


def save_and_train(manager: CheckpointManager, step: int, state: dict, cores: Cores,
                   steps_after: Callable[[], float], window: int, base: float
                   ) -> dict[str, float]:
    """One save, then at least `window` steps and every step started while it was in flight.
    Returns the time in save(), the steps' excess over `base`, and how many steps overlapped."""
    with cores.background():
        t0 = time.perf_counter()
        manager.save(step, state)
        in_save = time.perf_counter() - t0
    excess, overlapped, n = 0.0, 0, 0
    while n < window or manager.save_in_flight:
        in_flight = manager.save_in_flight
        dt = steps_after()
        excess += dt - base
        overlapped += int(in_flight)
        n += 1
    manager.wait()
    return {"in_save_s": in_save, "slowdown_s": excess, "lost_s": in_save + excess,
            "overlapped_steps": overlapped, "commit_s": manager.metrics["last_commit_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=8,
                        help="steps counted after each save (more while it is in flight)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--pin", action="store_true",
                        help="training on one core, the checkpoint's threads on another")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cores = Cores(args.pin)
    model, opt = build(args.dim, args.layers)
    batch = torch.randn(8, args.dim)
    train_step(model, opt, batch)  # AdamW now holds its two moments per parameter
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())
    state = {"app": ModelOptimizerState(model, opt)}

    def step_fn() -> float:
        return train_step(model, opt, batch)

    root = args.dir or tempfile.mkdtemp(prefix="ckpt-stall-")
    arms = {"sync": ("sync", "blocking"), "async": ("async", "deferred"),
            "async_blocking": ("async", "blocking")}
    managers = {name: CheckpointManager(f"{root}/{name}", CheckpointConfig(
        mode=mode, staging=staging, keep=1)) for name, (mode, staging) in arms.items()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    bases: list[float] = []
    step = 0
    for repeat in range(args.repeats):
        for _ in range(2):
            step_fn()  # settle after the previous arm's commit
        base = statistics.median(step_fn() for _ in range(args.window))
        bases.append(base)
        line = [f"repeat {repeat + 1}/{args.repeats}: step {base * 1e3:.0f} ms"]
        for name, manager in managers.items():
            step += 1
            r = save_and_train(manager, step, state, cores, step_fn, args.window, base)
            results[name].append(r)
            line.append(f"{name} lost {r['lost_s']:.3f} s (save() {r['in_save_s']:.3f} + "
                        f"slowdown {r['slowdown_s']:.3f}, {r['overlapped_steps']} overlapped)")
        print("; ".join(line), flush=True)
    for manager in managers.values():
        manager.close()

    def steady(name: str, key: str) -> float:
        xs = [r[key] for r in results[name]]
        return statistics.median(xs[1:] or xs)

    sync_lost = steady("sync", "lost_s")
    figures = {
        "bench": "ckpt_stall",
        "params": params,
        "state_bytes": state_bytes,
        "pinned": cores.pin,
        "train_step_s": round(statistics.median(bases), 4),
        **{f"{name}_{key}": round(steady(name, key), 4) for name in arms
           for key in ("lost_s", "in_save_s", "slowdown_s", "overlapped_steps", "commit_s")},
        "lost_over_sync": round(steady("async", "lost_s") / sync_lost, 4),
        "blocking_lost_over_sync": round(steady("async_blocking", "lost_s") / sync_lost, 4),
        "in_save_over_sync": round(steady("async", "in_save_s") / sync_lost, 4),
        "target": {"lost_over_sync": f"<= {TARGET_LOST_OVER_SYNC}"},
        "repeats": args.repeats,
        "window": args.window,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
