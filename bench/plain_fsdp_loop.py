"""The baseline of bench/trainer_overhead.py: the least code that trains the same model with
FSDP2 on the same shapes (random tokens, fixed lr, no data stream, metrics or checkpoints),
with gradient accumulation over micro-batches of `micro` samples per rank when `micro` > 0
(gradient sync on the last micro-batch only, as the trainer does).
Run under torchrun: `plain_fsdp_loop.py SIZE STEPS BATCH SEQ_LEN [MICRO]`; rank 0 prints one JSON
line with its step times."""

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


def main(size: str, steps: int, batch: int, seq_len: int, micro: int = 0) -> None:
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
    chunks = -(-batch // (world * micro)) if micro else 1
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = torch.randint(0, 256, (local, seq_len + 1))
        loss = torch.zeros(())
        for i, part in enumerate(x.tensor_split(chunks)):
            model.set_requires_gradient_sync(i == chunks - 1)
            logits = model(part[:, :-1])
            part_loss = F.cross_entropy(logits.view(-1, 256), part[:, 1:].reshape(-1),
                                        reduction="sum") / (local * seq_len)
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"step_times": times}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], *map(int, sys.argv[2:]))
