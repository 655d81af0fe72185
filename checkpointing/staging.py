"""Host-memory staging: the only part of an async save that blocks the training loop.

`HostStager.stage` copies a state dict (plain tensors, DTensors, nested dicts/lists, small Python
values) into CPU buffers that it keeps and reuses on the next save when shapes and dtypes match, so
steady-state staging is a memcpy into already-touched memory (no allocation, no page faults). The
caller must not stage again while a save still reads the previous buffers (the manager keeps at
most one save in flight and waits for it first). Safe to call from one thread at a time, any
thread: the manager stages deferred values from its writer thread.

Tensors on a GPU are staged into pinned (page-locked) host buffers with asynchronous copies, which
the device's DMA engine runs at full bandwidth, and `stage` waits for all of them once at the end;
CPU tensors (and machines without CUDA) take plain buffers and ordinary copies.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor


class HostStager:
    """Copies state dicts to reusable host buffers. Not thread-safe: one stage() at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._device_copies = False

    def stage(self, state: Any, key: str = "") -> Any:
        """A deep copy of `state` on the host; tensors shared inside `state` stay shared.

        `key` names the buffers: give each separately staged value its own.
        """
        memo: dict[int, Any] = {}
        self._device_copies = False
        with torch.no_grad():
            out = self._copy(state, key, memo)
        if self._device_copies:
            # The copies were queued on this thread's current stream; the buffers are read (by
            # the writer) only after they have landed.
            torch.cuda.current_stream().synchronize()
        return out

    def _copy(self, value: Any, key: str, memo: dict[int, Any]) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, DTensor):
            local = self._tensor(value.to_local(), key)
            out: Any = DTensor.from_local(local, value.device_mesh, value.placements,
                                          run_check=False, shape=value.shape,
                                          stride=value.stride())
        elif isinstance(value, torch.Tensor):
            out = self._tensor(value, key)
        elif isinstance(value, dict):
            out = type(value)() if type(value) is not dict else {}
            for k, v in value.items():
                out[k] = self._copy(v, f"{key}.{k}", memo)
        elif isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            items = [self._copy(v, f"{key}.{i}", memo) for i, v in enumerate(value)]
            out = items if isinstance(value, list) else tuple(items)
        else:
            out = copy.deepcopy(value)
        memo[id(value)] = out
        return out

    def _tensor(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        src = tensor.detach()
        pinned = src.is_cuda
        buf = self._buffers.get(key)
        if (buf is None or buf.shape != src.shape or buf.dtype != src.dtype
                or buf.stride() != src.stride() or buf.is_pinned() != pinned):
            buf = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device="cpu",
                                      pin_memory=pinned)
            self._buffers[key] = buf
        buf.copy_(src, non_blocking=pinned)
        self._device_copies |= pinned
        return buf

    def release(self) -> None:
        """Forget the buffers (memory goes back once no save holds them)."""
        self._buffers.clear()
