"""Process group, device and FSDP2 sharding, chosen at run time (cuda+nccl, else cpu+gloo)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from elastic_train.config import ParallelConfig
from elastic_train.node import contract
from elastic_train.spec import TrainSpec


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_timeout(cfg: ParallelConfig, backend: str) -> float:
    """Seconds a collective may take before the worker fails: short on gloo, where a step is
    seconds long and a vanished peer should cost little; long on NCCL, where first-step
    compilation and large all-gathers are slow."""
    if cfg.collective_timeout_s > 0:
        return cfg.collective_timeout_s
    return 20.0 if backend == "gloo" else 600.0


def init(cfg: ParallelConfig) -> World:
    """Join the process group torchrun describes, or form a world of one without torchrun."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=collective_timeout(cfg, backend))
    store = _rendezvous_store(timeout)
    dist.init_process_group(
        backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
        store=store, rank=int(os.environ["RANK"]) if store is not None else -1,
        world_size=int(os.environ["WORLD_SIZE"]) if store is not None else -1,
    )
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def _rendezvous_store(timeout: timedelta) -> dist.Store | None:
    """The world's store: under our `c10d-fast` rendezvous, a prefix of the rendezvous store,
    which is listening already; else None (torchrun's MASTER_ADDR/PORT, where rank 0 opens a
    store and a rank that comes first retries with a backoff, which every re-form then waits
    out). The prefix is this world's round, the same on every rank and new at every re-form."""
    if (found := contract.world_store()) is None:
        return None
    endpoint, key = found
    host, _, port = endpoint.rpartition(":")
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout,
                          wait_for_workers=False)
    return dist.PrefixStore(f"{key}/{contract.PROCESS_GROUP}", store)


def mixed_precision(cfg: ParallelConfig, device: torch.device) -> MixedPrecisionPolicy:
    """fp32 on CPU by default (a CPU without bf16 instructions computes bf16 slower than fp32);
    bf16 params with fp32 gradient reduction on GPU."""
    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_per_block(model: nn.Module, blocks: Sequence[nn.Module],
                    fsdp_kwargs: dict[str, Any]) -> None:
    """The default sharding plan: `fully_shard` each block, then the root (what is left:
    embeddings, head, norms), so that one block's parameters are gathered at a time."""
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute `block`'s activations in the backward pass instead of keeping them: the
    block's own forward is replaced by a non-reentrant `torch.utils.checkpoint` of it. Parameter
    names and the state dict are unchanged (no wrapper module), and FSDP2's hooks, which run
    around the module's call, still gather the parameters for the recomputation."""
    forward = block.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed  # type: ignore[method-assign]


def shard(model: nn.Module, spec: TrainSpec, world: World, cfg: ParallelConfig) -> nn.Module:
    """`model` moved to the world's device, with activation checkpointing and `torch.compile`
    applied per block when configured, then sharded over a 1-D mesh of the whole world by the
    spec's plan (default `shard_per_block`).

    FSDP2 averages gradients over the world (gloo has no pre-multiplied sum, so the divide
    factor stays); the trainer scales the summed gradient by the world size to undo that.
    A `torch.compile` that cannot compile (no C++ compiler for a CPU build) fails at the first
    forward, not here."""
    if not is_meta(model):  # a meta model is allocated on the device once sharded
        model = model.to(world.device)
    blocks = list(spec.blocks(model))
    for block in blocks:
        if cfg.activation_checkpointing:
            checkpoint_activations(block)
        if cfg.compile:
            block.compile()
    mesh = init_device_mesh(world.device.type, (world.size,))
    plan = spec.shard or shard_per_block
    plan(model, blocks, {"mesh": mesh, "mp_policy": mixed_precision(cfg, world.device)})
    return model


def is_meta(model: nn.Module) -> bool:
    """Whether `model` was built on the meta device (shapes only, no memory)."""
    return any(p.is_meta for p in model.parameters())


def uses_meta_init(spec: TrainSpec, cfg: ParallelConfig, device: torch.device) -> bool:
    """Whether to build `spec`'s model on the meta device (`parallel.meta_init`): only a spec
    that can initialise a sharded model (`init_weights`); on `auto`, only where DTensor's random
    ops follow the whole tensor whatever the sharding (CUDA-like devices), so the initial weights
    are the same at any world size."""
    if spec.init_weights is None or cfg.meta_init == "off":
        return False
    return cfg.meta_init == "on" or device.type not in ("cpu", "meta")


def materialise(model: nn.Module, init_weights: Callable[[nn.Module], None], seed: int,
                world: World) -> None:
    """Allocate this rank's shards of a sharded meta model on the world's device and initialise
    them with the spec's `init_weights`. On CPU, DTensor's random ops draw each shard from this
    rank's own generator, so it is seeded per rank (else every shard would repeat the same
    numbers). Raises what `init_weights` raises."""
    model.to_empty(device=world.device)
    torch.manual_seed(seed if world.device.type != "cpu" else seed + world.rank)
    with torch.no_grad():
        init_weights(model)
