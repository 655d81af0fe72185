"""The trainer under real torchrun processes (CPU, gloo): reproducible, world-size independent,
resumable at any step and world size, and it learns."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torchrun_util import events, final_weights, steps, train

from checkpointing import CheckpointConfig, CheckpointError, CheckpointManager
from elastic_train.interval import AdaptiveInterval
from elastic_train.notices import NoticeWatcher
from elastic_train.save_policy import SavePolicy

STEPS = 12
COMMON = (f"--steps={STEPS}", "--checkpoint.every=6", "--data.batch_size=12",
          "--data.seq_len=64", "--optim.warmup_steps=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted reference runs shared by the tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, nproc in [("w1", 1), ("w2", 2), ("w2_again", 2), ("w3", 3)]:
        out[name] = root / name
        train(out[name], nproc, *COMMON)
    return out


def test_same_seed_and_world_size_give_bit_identical_losses_and_weights(runs):
    a, b = runs["w2"], runs["w2_again"]
    assert [r["loss"] for r in steps(a)] == [r["loss"] for r in steps(b)]
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("other", ["w2", "w3"])
def test_world_sizes_1_2_3_see_the_same_batches_and_agree_on_the_loss(runs, other):
    ref, run = steps(runs["w1"]), steps(runs[other])
    assert [r["batch_digest"] for r in run] == [r["batch_digest"] for r in ref]
    assert [r["world_size"] for r in run] == [int(other[1])] * STEPS
    # Same batches, same full-batch mean gradient; only the order of float additions differs
    # (per-rank partial sums, then gloo's reduction). In fp32 that moves a loss of ~4 by a few
    # ulps per step (1 ulp = 5e-7 at 4), and Adam can amplify tiny gradient differences over
    # 12 steps: 1e-4 relative is ~100x what we observe and far below any real divergence.
    for a, b in zip(ref, run, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    wa, wb = final_weights(runs["w1"]), final_weights(runs[other])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("resume_world", [1, 3])
def test_a_run_stopped_at_step_s_and_resumed_at_another_world_size_continues_exactly(
    runs, tmp_path: Path, resume_world: int
):
    """Stop a 2-rank run after the step-6 commit, resume at another world size."""
    run = tmp_path / "run"
    step6 = Path("checkpoints") / "step_00000006"
    shutil.copytree(runs["w2"] / step6, run / step6)
    out = train(run, resume_world, *COMMON)
    assert "from step 6" in out.stdout
    resumed = steps(run)
    assert [r["step"] for r in resumed] == list(range(7, STEPS + 1))
    ref = steps(runs["w2"])[6:]
    assert [r["batch_digest"] for r in resumed] == [r["batch_digest"] for r in ref]
    for a, b in zip(ref, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_resuming_at_the_same_world_size_is_bit_identical(runs, tmp_path: Path):
    run = tmp_path / "run"
    step6 = Path("checkpoints") / "step_00000006"
    shutil.copytree(runs["w2"] / step6, run / step6)
    train(run, 2, *COMMON)
    assert [r["loss"] for r in steps(run)] == [r["loss"] for r in steps(runs["w2"])[6:]]
    wa, wb = final_weights(runs["w2"]), final_weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_falls_on_the_embedded_corpus(tmp_path: Path):
    train(tmp_path, 2, "--steps=60", "--checkpoint.every=0", "--data.seq_len=64")
    losses = [r["loss"] for r in steps(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # ln(256) = 5.5 at init; bytes of English fall fast


def test_metrics_lines_carry_the_contract_fields(runs):
    for r in steps(runs["w2"]):
        fields = {"step", "loss", "lr", "world_size", "batch_digest", "tokens_per_s", "time"}
        assert fields <= set(r)


def test_batch_larger_than_world_is_required_at_start(tmp_path: Path):
    proc = train(tmp_path, 3, "--data.batch_size=2", "--steps=2", check=False)
    assert proc.returncode != 0
    assert "data.batch_size=2 is smaller than the world size 3" in proc.stderr


def _checkpointed_interval(run_dir: Path) -> dict:
    """The adaptive interval's state in the run's newest checkpoint."""
    state: dict = {"policy": {"interval": None}}
    with CheckpointManager((run_dir / "checkpoints").as_uri()) as manager:
        manager.load(state)
    return json.loads(state["policy"]["interval"])


def test_adaptive_interval_saves_within_its_bounds_and_resumes_what_it_learned(tmp_path: Path):
    adaptive = ("--checkpoint.interval=adaptive", "--checkpoint.min_every=3",
                "--checkpoint.max_every=5", "--checkpoint.keep=10", "--data.seq_len=64")
    train(tmp_path, 2, "--steps=16", *adaptive)
    commits = [e["step"] for e in events(tmp_path, "commit")]
    assert commits[-1] == 16
    periodic = commits[:-1]  # the last is the final step's own save
    gaps = [b - a for a, b in zip([0, *periodic[:-1]], periodic, strict=True)]
    assert gaps and all(3 <= g <= 5 for g in gaps), commits
    ledger = tmp_path / "checkpoints" / "ledger.json"
    assert ledger.exists(), "the ledger is still kept for reports"
    first = _checkpointed_interval(tmp_path)
    assert first["costs"] and first["interruptions"] == []
    ledger.unlink()  # what the interval knows comes back from the checkpoint alone
    train(tmp_path, 2, "--steps=20", *adaptive)
    second = _checkpointed_interval(tmp_path)
    assert len(second["interruptions"]) == 1, "the resume counts as one interruption"
    assert second["costs"][:len(first["costs"])] == first["costs"], "costs learned before"
    assert second["since"] == first["since"]


def test_a_checkpoint_without_a_policy_entry_loads_and_other_missing_entries_raise(
        tmp_path: Path):
    fresh = SavePolicy(STEPS, NoticeWatcher([]), interval=AdaptiveInterval(1, 5))
    settings = CheckpointConfig(mode="sync")
    with CheckpointManager(tmp_path.as_uri(), settings) as manager:
        manager.save(6, {"trainer": {"step": 6, "config_digest": "old"}})  # an earlier version
        state = {"trainer": {"step": 0, "config_digest": ""}, "policy": fresh}
        assert manager.load(state, optional={"policy"}) == 6
        assert state["trainer"] == {"step": 6, "config_digest": "old"}
        with pytest.raises(CheckpointError, match="Missing key"):
            manager.load({"app": {"x": 0}, "policy": fresh}, optional={"policy"})


def test_a_model_built_on_the_meta_device_trains_and_resumes_exactly(runs, tmp_path: Path):
    """`parallel.meta_init=on`: the GPT is built on the meta device, sharded over 2 ranks, and
    only each rank's shards are allocated and initialised. From scratch it trains (finite losses
    that fall: nothing left uninitialised); resumed from the full-built run's step-6 commit it
    continues bit-identically (the restore overwrites every shard it allocated)."""
    scratch = tmp_path / "scratch"
    out = train(scratch, 2, *COMMON, "--parallel.meta_init=on")
    assert "built on the meta device" in out.stdout
    losses = [r["loss"] for r in steps(scratch)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    # Another initialisation draw, the same distributions: it starts where the full build does.
    assert losses[0] == pytest.approx(steps(runs["w2"])[0]["loss"], rel=0.05)
    weights = final_weights(scratch)
    assert all(torch.isfinite(w).all() for w in weights.values())

    resumed = tmp_path / "resumed"
    step6 = Path("checkpoints") / "step_00000006"
    shutil.copytree(runs["w2"] / step6, resumed / step6)
    train(resumed, 2, *COMMON, "--parallel.meta_init=on")
    assert [r["loss"] for r in steps(resumed)] == [r["loss"] for r in steps(runs["w2"])[6:]]
    wa, wb = final_weights(runs["w2"]), final_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(("meta_init", "device", "with_init", "expected"), [
    ("auto", "cpu", True, False),   # DTensor's CPU random ops would depend on the world size
    ("auto", "cuda", True, True),
    ("on", "cpu", True, True),
    ("off", "cuda", True, False),
    ("on", "cuda", False, False),   # a spec that cannot initialise a sharded model
])
def test_which_models_are_built_on_the_meta_device(meta_init, device, with_init, expected):
    from elastic_train.config import ParallelConfig
    from elastic_train.distributed import uses_meta_init
    from elastic_train.model import TINY

    spec = TINY if with_init else dataclasses.replace(TINY, init_weights=None)
    assert uses_meta_init(spec, ParallelConfig(meta_init=meta_init),
                          torch.device(device)) is expected
