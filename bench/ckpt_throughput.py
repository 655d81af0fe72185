"""Checkpoint write and load throughput to a local S3 server (moto) vs the best plain s3fs
transfer of the same bytes.

    .venv/bin/python bench/ckpt_throughput.py [--mb 256 --repeats 3 --objects 8]

Starts moto on a free loopback port. Per repeat, interleaved so load noise hits all alike:
plain s3fs uploads of the checkpoint's bytes as one object (`pipe_file`) and as `--objects`
objects at once (`pipe` of a dict: s3fs sends them concurrently), a `CheckpointManager` sync
save (DCP through our writer), plain s3fs reads of the same (`cat_file`; `cat` of the list, at
once), a manager load (our parallel ranged reader), and DCP's stock `FsspecReader` load.

The baseline of each direction is the faster of the two plain transfers (median over repeats):
a baseline of one object in one stream against our threaded transfers would flatter us.
Prints one final JSON line; ratios compare medians measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import s3fs  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # noqa: E402

from chaos.services import MotoS3Server  # noqa: E402
from checkpointing import CheckpointConfig, CheckpointManager  # noqa: E402
from checkpointing.commit import step_dir  # noqa: E402


def make_state(total_mb: int, dim: int = 512) -> dict[str, torch.Tensor]:
    """Tensors shaped like a GPT's: per block four matrices, their biases and two LayerNorms,
    so the checkpoint mixes a few large items with many small ones, as a real model's does."""
    g = torch.Generator().manual_seed(0)
    shapes = {"attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
              "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "mlp.fc.weight": (4 * dim, dim), "mlp.fc.bias": (4 * dim,),
              "mlp.proj.weight": (dim, 4 * dim), "mlp.proj.bias": (dim,),
              "ln1.weight": (dim,), "ln1.bias": (dim,), "ln2.weight": (dim,), "ln2.bias": (dim,)}
    per_block = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    blocks = max(1, total_mb * 2**20 // per_block)
    return {f"blocks.{i}.{name}": torch.randn(shape, generator=g)
            for i in range(blocks) for name, shape in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="checkpoint size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objects", type=int, default=8,
                        help="objects of the concurrent plain transfer")
    args = parser.parse_args()

    tensors = make_state(args.mb)
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    mib = nbytes / 2**20
    with MotoS3Server() as server:
        os.environ.update(server.env())
        options = server.storage_options()
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir("bench")
        blob = b"".join(t.numpy().tobytes() for t in tensors.values())
        uri = "s3://bench/run"
        manager = CheckpointManager(uri, CheckpointConfig(mode="sync", keep=1),
                                    storage_options=options)
        part = -(-len(blob) // args.objects)
        parts = {f"bench/plain/{i:04d}.bin": blob[i * part:(i + 1) * part]
                 for i in range(args.objects)}
        put, put_n, save, get, get_n, load, stock = [], [], [], [], [], [], []
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            fs.pipe_file("bench/plain.bin", blob)
            put.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            fs.pipe(parts)
            put_n.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            manager.save(step, {"model": tensors})
            save.append(time.perf_counter() - t0)
            saved_bytes = manager.steps()[-1].total_bytes

            fs.invalidate_cache()
            t0 = time.perf_counter()
            assert len(fs.cat_file("bench/plain.bin")) == nbytes
            get.append(time.perf_counter() - t0)

            fs.invalidate_cache()
            t0 = time.perf_counter()
            got = fs.cat(list(parts))
            get_n.append(time.perf_counter() - t0)
            assert sum(len(v) for v in got.values()) == nbytes

            target = {"model": {k: torch.empty_like(v) for k, v in tensors.items()}}
            t0 = time.perf_counter()
            assert manager.load(target) == step
            load.append(time.perf_counter() - t0)
            assert all(torch.equal(target["model"][k], v) for k, v in tensors.items())

            target = {"model": {k: torch.empty_like(v) for k, v in tensors.items()}}
            t0 = time.perf_counter()
            dcp.load(target, storage_reader=FsspecReader(f"{uri}/{step_dir(step)}", **options),
                     no_dist=True)
            stock.append(time.perf_counter() - t0)
        manager.close()

    def mbps(times: list[float], size: float = mib) -> float:
        return round(size / statistics.median(times), 1)

    best_put = min(statistics.median(put), statistics.median(put_n))
    best_get = min(statistics.median(get), statistics.median(get_n))
    figures = {
        "bench": "ckpt_throughput",
        "checkpoint_mib": round(mib, 1),
        "saved_mib": round(saved_bytes / 2**20, 1),
        "objects": args.objects,
        "plain_put_one_MiBps": mbps(put),
        "plain_put_concurrent_MiBps": mbps(put_n),
        "plain_put_best_MiBps": round(mib / best_put, 1),
        "save_MiBps": mbps(save),
        "write_ratio": round(best_put / statistics.median(save), 3),
        "plain_get_one_MiBps": mbps(get),
        "plain_get_concurrent_MiBps": mbps(get_n),
        "plain_get_best_MiBps": round(mib / best_get, 1),
        "load_MiBps": mbps(load),
        "load_ratio": round(best_get / statistics.median(load), 3),
        "stock_dcp_load_MiBps": mbps(stock),
        "stock_dcp_load_ratio": round(best_get / statistics.median(stock), 3),
        "targets": {"write_ratio": ">= 0.9", "load_ratio": ">= 0.8"},
        "repeats": args.repeats,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
