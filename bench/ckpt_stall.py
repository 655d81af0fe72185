"""How long `CheckpointManager.save` blocks the training loop, async vs sync, for a ~100M-param
model with AdamW state, against a plain host copy of the same tensors.

    .venv/bin/python bench/ckpt_stall.py [--dim 2048 --layers 24 --repeats 3 --dir /tmp/x]

Single process (world of one), file:// storage in a temporary directory, real training steps
(forward, backward, AdamW) between saves. The stall of an async save is the time `save()` takes
plus the time the next `optimizer.step()` waits for the background copy (deferred staging; the
"blocking" variant copies inside `save()`). Prints one final JSON line; the ratios compare
figures measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState


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


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    for s in opt.state.values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    model, opt = build(args.dim, args.layers)
    batch = torch.randn(8, args.dim)
    train_step(model, opt, batch)  # AdamW now holds its two moments per parameter
    params = sum(p.numel() for p in model.parameters())
    tensors = state_tensors(model, opt)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    state = {"app": ModelOptimizerState(model, opt)}

    root = args.dir or tempfile.mkdtemp(prefix="ckpt-stall-")
    managers = {name: CheckpointManager(f"{root}/{name}", CheckpointConfig(
        mode=mode, staging=staging, keep=1)) for name, mode, staging in
        (("sync", "sync", "blocking"), ("deferred", "async", "deferred"),
         ("blocking", "async", "blocking"))}
    copies, syncs, steps = [], [], []
    stalls: dict[str, list[float]] = {"deferred": [], "blocking": []}
    after: dict[str, list[float]] = {"deferred": [], "blocking": []}  # step right after save
    commits: list[float] = []
    step = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        copy = [t.clone() for t in tensors]  # the plain host copy of the same tensors
        copies.append(time.perf_counter() - t0)
        del copy
        steps.append(train_step(model, opt, batch))  # a step with no save, for reference

        step += 1
        t0 = time.perf_counter()
        managers["sync"].save(step, state)
        syncs.append(time.perf_counter() - t0)

        for name in ("deferred", "blocking"):
            manager = managers[name]
            fences = manager.metrics["fence_waits"]
            t0 = time.perf_counter()
            manager.save(step, state)
            returned = time.perf_counter() - t0
            # Its optimizer.step() may wait for the copy, and the copy competes for the CPU.
            after[name].append(train_step(model, opt, batch))
            fence = manager.metrics["last_fence_wait_s"] \
                if manager.metrics["fence_waits"] > fences else 0.0
            stalls[name].append(returned + fence)
            manager.wait()
            commits.append(manager.metrics["last_commit_s"])
    for manager in managers.values():
        manager.close()

    # The first async save allocates its staging buffers; later ones reuse them.
    def steady(xs: list[float]) -> float:
        return statistics.median(xs[1:] or xs)

    stall = steady(stalls["deferred"])
    figures = {
        "bench": "ckpt_stall",
        "params": params,
        "state_bytes": state_bytes,
        "train_step_s": round(statistics.median(steps), 4),
        "plain_copy_s": round(statistics.median(copies), 4),
        "sync_save_s": round(statistics.median(syncs), 4),
        "async_stall_s": round(stall, 4),
        "async_stall_first_s": round(stalls["deferred"][0], 4),
        "async_blocking_stall_s": round(steady(stalls["blocking"]), 4),
        "async_commit_s": round(statistics.median(commits), 4),
        "train_step_after_deferred_save_s": round(steady(after["deferred"]), 4),
        "train_step_after_blocking_save_s": round(steady(after["blocking"]), 4),
        "stall_over_sync": round(stall / statistics.median(syncs), 4),
        "stall_over_plain_copy": round(stall / statistics.median(copies), 3),
        "blocking_stall_over_sync": round(steady(stalls["blocking"]) / statistics.median(syncs),
                                          4),
        "targets": {"stall_over_sync": "<= 0.05", "stall_over_plain_copy": "<= 2"},
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
