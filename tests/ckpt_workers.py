"""Worker processes for the checkpointing tests, and helpers shared by those tests.

Run as a script under torchrun (multi-rank) or plain python (single rank):

    torchrun --standalone --nproc-per-node=W tests/ckpt_workers.py train_save '{"uri": ...}'
    torchrun --standalone --nproc-per-node=W tests/ckpt_workers.py load_check '{"uri": ...}'
    python tests/ckpt_workers.py kill_writer '{"uri": ...}'
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Trainer:
    """A stand-in for the trainer's Stateful: small Python values only."""

    def __init__(self, step: int = 0, digest: str = "cfg-1") -> None:
        self.step = step
        self.digest = digest

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "digest": self.digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.digest = str(state["digest"])


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


def build_model(seed: int = 0, dim: int = 32, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(dim) for _ in range(depth)], nn.Linear(dim, 4))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, first: int, count: int,
                rank: int = 0) -> None:
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(8, model[0].fc.in_features, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state as full CPU tensors (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    # Unsharded, these may alias the live parameters: copy so later steps cannot change them.
    return copy.deepcopy({"model": model_sd, "optim": optim_sd})


def assert_same(a: Any, b: Any, where: str = "") -> int:
    """torch.equal on every tensor of two nested states; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        return sum(assert_same(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        pairs = enumerate(zip(a, b, strict=True))
        return sum(assert_same(x, y, f"{where}.{i}") for i, (x, y) in pairs)
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


# -- launching ---------------------------------------------------------------------------------
def run_ranks(nproc: int, role: str, args: dict[str, Any], timeout: float = 120,
              env: dict[str, str] | None = None) -> None:
    """Run this script's `role` on `nproc` ranks under torchrun; raise with its output if it
    fails or overruns (then its whole process group is killed)."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), role, json.dumps(args)]
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{role} x{nproc} timed out:\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{role} x{nproc} exited {proc.returncode}:\n{out[-4000:]}")


def spawn_single(role: str, args: dict[str, Any], env: dict[str, str] | None = None,
                 stdin: int | None = None) -> subprocess.Popen[str]:
    """Start this script's `role` as one plain process (no torch.distributed); `stdin`
    (e.g. subprocess.PIPE) as Popen takes it."""
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), role,
                             json.dumps(args)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env,
                            start_new_session=True)


# -- roles -------------------------------------------------------------------------------------
def _fsdp_setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, int, int]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model(seed)
    for block in list(model)[:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, rank, world


def role_train_save(args: dict[str, Any]) -> None:
    """Optionally load and check `args["check"]` first (see `_load_and_check`), then train an
    FSDP2 model, saving asynchronously every `every` steps while training goes on; rank 0
    stores the full state at each saved step as `expected_{step}.pt` in `out`."""
    import torch.distributed as dist

    from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState

    model, opt, rank, world = _fsdp_setup(seed=0 if "check" not in args else 123)
    trainer = Trainer()
    state = {"app": ModelOptimizerState(model, opt), "trainer": trainer}
    first = 1
    if "check" in args:
        first = _load_and_check(args["check"], state, model, opt, rank, world) + 1
    config = CheckpointConfig(keep=10, mode="async", staging=args.get("staging", "deferred"))
    manager = CheckpointManager(args["uri"], config, config_digest="cfg-1")
    out = Path(args["out"])
    steps_during_save = 0
    for step in range(first, first + args["steps"]):
        # A step that starts while the previous save is still uploading overlaps it.
        steps_during_save += int(manager.save_in_flight)
        train_steps(model, opt, step, 1, rank)
        trainer.step = step
        if step % args["every"] == 0:
            expected = full_state(model, opt)
            manager.save(step, state)
            if rank == 0:
                torch.save({"state": expected, "trainer": trainer.state_dict()},
                           out / f"expected_{step}.pt")
    manager.wait()
    if rank == 0:
        (out / f"train_save_{world}.json").write_text(json.dumps(
            {"metrics": manager.metrics, "steps_during_save": steps_during_save}))
    manager.close()
    dist.destroy_process_group()


def _load_and_check(check: dict[str, Any], state: dict[str, Any], model: nn.Module,
                    opt: torch.optim.Optimizer, rank: int, world: int) -> int:
    """Load step `check["step"]` from `check["uri"]` into this (differently initialised) world
    and compare the full model and optimizer state with `{check["out"]}/expected_{step}.pt`;
    rank 0 writes `load_check_{world}_{step}.json` there."""
    from checkpointing import CheckpointManager

    with CheckpointManager(check["uri"]) as manager:
        restored = manager.load(state, step=check["step"])
    assert restored == check["step"], restored
    got = full_state(model, opt)
    if rank == 0:
        out = Path(check["out"])
        expected = torch.load(out / f"expected_{restored}.pt", weights_only=False)
        compared = assert_same(expected["state"], got)
        assert state["trainer"].state_dict() == expected["trainer"], state["trainer"]
        (out / f"load_check_{world}_{restored}.json").write_text(
            json.dumps({"tensors": compared}))
    return restored


def role_load_check(args: dict[str, Any]) -> None:
    """Only `_load_and_check(args)` over this world."""
    import torch.distributed as dist

    from checkpointing import ModelOptimizerState

    model, opt, rank, world = _fsdp_setup(seed=123)
    state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer(-1, "other")}
    _load_and_check(args, state, model, opt, rank, world)
    train_steps(model, opt, 100, 1, rank)  # training goes on after a resharded load
    dist.destroy_process_group()


def role_kill_writer(args: dict[str, Any]) -> None:
    """Commit step 1 (sync), say so on stdout, then save step 2 (the test kills us during it)."""
    from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState

    model = build_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1, 2)
    manager = CheckpointManager(args["uri"], CheckpointConfig(mode=args.get("mode", "sync")),
                                config_digest="cfg-1")
    state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)}
    manager.save(1, state)
    manager.wait()
    torch.save(full_state(model, opt), Path(args["out"]) / "expected_1.pt")
    print("COMMITTED 1", flush=True)
    train_steps(model, opt, 3, 1)
    manager.save(2, state)
    manager.wait()
    print("COMMITTED 2", flush=True)
    time.sleep(60)


def role_fail_save(args: dict[str, Any]) -> None:
    """Commit step 1, then save step 2 while storage refuses rank 1's files for good: every rank
    must see the failure (SaveFailed with on_failure="stop"), none may hang, step 1 stays newest.
    Then load step 2, which is not committed: rank 0 finds that out, every rank must raise it.
    Each rank writes `fail_save_{rank}.json`."""
    import torch.distributed as dist

    from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState, SaveFailed

    model, opt, rank, world = _fsdp_setup(seed=0)
    events: list[dict[str, Any]] = []
    config = CheckpointConfig(on_failure="stop", retry_timeout_s=1.0)
    manager = CheckpointManager(args["uri"], config, on_event=events.append)
    state = {"app": ModelOptimizerState(model, opt), "trainer": Trainer(1)}
    manager.save(1, state)
    manager.wait()
    train_steps(model, opt, 2, 1, rank)
    manager.save(2, state)
    raised = ""
    try:
        manager.wait()
    except SaveFailed as e:
        raised = str(e)
    load_raised = ""
    try:
        manager.load(state, step=2)
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        load_raised = f"{type(e).__name__}: {e}"
    result = {"raised": raised, "metrics": manager.metrics, "events": events,
              "latest": manager.latest_step(), "load_raised": load_raised}
    manager.close()
    Path(args["out"], f"fail_save_{rank}.json").write_text(json.dumps(result, default=str))
    dist.destroy_process_group()


def role_writer(args: dict[str, Any]) -> None:
    """A writer of one run driven line by line on stdin, answering one line each on stdout:
    `claim` -> `EPOCH n`; `save N` -> `COMMITTED N` or `FAILED N <reason>`; `gc` -> `GC n` or
    `FAILED gc <reason>`; `quit`. Storage comes from the environment (FSSPEC_S3_* for S3)."""
    from checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
    from checkpointing import ModelOptimizerState as MOS

    model = build_model(seed=args.get("seed", 0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(args["uri"], CheckpointConfig(mode="sync", keep=1))
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            break
        try:
            if command == "claim":
                manager.check_storage()
                answer = f"EPOCH {manager.writer_epoch}"
            elif command == "save":
                step = int(rest[0])
                manager.save(step, {"app": MOS(model, opt), "trainer": Trainer(step)})
                answer = f"COMMITTED {step}"
            else:
                answer = f"GC {len(manager.gc())}"
        except CheckpointError as e:
            answer = f"FAILED {rest[0] if rest else command} {e}"
        print(answer, flush=True)
    manager.close()


ROLES = {"train_save": role_train_save, "load_check": role_load_check,
         "kill_writer": role_kill_writer, "fail_save": role_fail_save, "writer": role_writer}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
