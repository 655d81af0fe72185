"""`elastic-train export RUN_URI --out model.safetensors`: a committed checkpoint's model weights
as one consolidated file, without the optimizer, for tools that know nothing of this project.

The checkpoint may have been saved at any world size: DCP's metadata lists every tensor with its
global shape, so the export reads each whole tensor into one process (no process group) and
writes it under its module name (`blocks.0.attn.qkv.weight`), the names a plain `nn.Module`'s
`state_dict()` has. Model tensors are those under `--prefix` (the trainer's `app.model`).

What happens on failure: the step's files are verified against its COMMIT.json (sizes and CRC-32)
before anything is read; a step that is not committed, or fails verification, exits 1 naming it
and writes nothing. The output is written to a temporary name beside `--out` and renamed, so a
failed export never leaves a half-written file under the name asked for.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpointing.commit import committed_info, step_dir, verify_step
from checkpointing.dcp_io import ParallelReader
from checkpointing.errors import CorruptCheckpoint
from checkpointing.storage import Storage

MODEL_PREFIX = "app.model"
"""Where the trainer's `ModelOptimizerState` keeps the model's tensors in a checkpoint."""
Format = Literal["safetensors", "torch"]


def read_model_weights(storage: Storage, step: int | None = None, prefix: str = MODEL_PREFIX
                       ) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, full CPU tensors by module name) of committed `step` (default: the newest).

    Raises NoSuchCheckpoint when the step is not committed (or nothing is), CorruptCheckpoint
    when its files do not match COMMIT.json, ValueError when it holds no tensor under `prefix`."""
    info = committed_info(storage, step)
    report = verify_step(storage, info, deep=True)
    if not report.ok:
        raise CorruptCheckpoint(report.detail)
    reader = ParallelReader(storage.child(step_dir(info.step)), info.files)
    head = prefix + "."
    weights = {
        fqn: torch.empty(meta.size, dtype=meta.properties.dtype)
        for fqn, meta in reader.read_metadata().state_dict_metadata.items()
        if fqn.startswith(head) and isinstance(meta, TensorStorageMetadata)
    }
    if not weights:
        raise ValueError(f"step {info.step} under {storage.url} has no tensors under {prefix!r}")
    dcp.load(weights, storage_reader=reader, no_dist=True)
    return info.step, {fqn[len(head):]: t for fqn, t in weights.items()}


def encode_weights(weights: dict[str, torch.Tensor], fmt: Format) -> bytes:
    """`weights` as the bytes of a safetensors or `torch.save` file (for an object store)."""
    if fmt == "safetensors":
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in weights.items()})
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


def write_weights(weights: dict[str, torch.Tensor], out: Path, fmt: Format) -> None:
    """Write `weights` to `out` atomically (a temporary name, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    else:
        torch.save(weights, tmp)
    os.replace(tmp, out)


def cmd_export(args: argparse.Namespace) -> int:
    from checkpointing.cli import storage_for

    step, weights = read_model_weights(storage_for(args.uri), args.step, args.prefix)
    write_weights(weights, Path(args.out), args.format)
    total = sum(t.numel() for t in weights.values())
    print(f"step {step}: {len(weights)} tensors, {total / 1e6:.1f}M values -> {args.out} "
          f"({args.format})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from checkpointing.cli import guarded, non_negative

    p = subparsers.add_parser(
        "export", help="write a committed checkpoint's model weights to one file",
        description=__doc__.split("\n\n")[0])
    p.add_argument("uri", metavar="RUN_URI", help="s3://, gs://, file:// or a path")
    p.add_argument("--step", type=non_negative, default=None, help="default: the newest committed")
    p.add_argument("--out", required=True, help="the file to write (e.g. model.safetensors)")
    p.add_argument("--format", choices=["safetensors", "torch"], default=None,
                   help="default: from --out's suffix (.safetensors, else torch.save)")
    p.add_argument("--prefix", default=MODEL_PREFIX,
                   help=f"the state entry holding the model (default {MODEL_PREFIX})")

    def run(args: argparse.Namespace) -> int:
        if args.format is None:
            args.format = "safetensors" if args.out.endswith(".safetensors") else "torch"
        return cmd_export(args)

    p.set_defaults(func=guarded(run, "elastic-train export"))
