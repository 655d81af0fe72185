"""The baseline of bench/trainer_overhead.py: the least code that trains the same model with
FSDP2 on the same shapes (random tokens, fixed lr, no data stream, metrics or checkpoints).
Run under torchrun; rank 0 prints one JSON line with its step times."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from elastic_train.model import GPT, config_for


def main(size: str, steps: int, batch: int, seq_len: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(config_for(size, seq_len, 256))
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    local = batch // world + (rank < batch % world)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = torch.randint(0, 256, (local, seq_len + 1))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.view(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss.detach())
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"step_times": times}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
