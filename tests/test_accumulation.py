"""Gradient accumulation: the step's gradient is the full global batch's mean at any world size
and any `data.micro_batch`, and a smaller world runs more micro-batches, never larger ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_util import final_weights, steps, train

TESTS = Path(__file__).resolve().parent
# Five samples do not divide among two ranks nor into micro-batches of 2 or 3: shares of 2 and 3,
# micro-batches of unequal length, and (world 2, micro 1) a rank that pads a micro-batch.
ONE_STEP = ("--model=sgd_specs:TINY_SGD", "--steps=1", "--checkpoint.every=0",
            "--data.batch_size=5", "--data.seq_len=32", "--optim.lr=1.0",
            "--optim.warmup_steps=0", "--optim.grad_clip=0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, the whole batch in one forward: the plain full-batch gradient."""
    run = tmp_path_factory.mktemp("accum") / "w1"
    train(run, 1, *ONE_STEP, pythonpath=TESTS)
    return run


@pytest.mark.parametrize("world,micro,recompute", [(1, 2, False), (2, 0, False), (2, 1, False),
                                                   (2, 3, False), (2, 2, True)])
def test_one_step_gives_the_same_weights_at_any_world_size_and_micro_batch(
    reference: Path, tmp_path: Path, world: int, micro: int, recompute: bool
):
    """Also with activation checkpointing on: recomputed blocks give the same gradient."""
    run = tmp_path / "run"
    out = train(run, world, *ONE_STEP, f"--data.micro_batch={micro}",
                f"--parallel.activation_checkpointing={recompute}", pythonpath=TESTS)
    expected_micro = -(-5 // (world * micro)) if micro else 1
    assert f"{expected_micro} micro-batch(es) per step" in out.stdout
    ref, got = steps(reference)[0], steps(run)[0]
    assert got["batch_digest"] == ref["batch_digest"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    wa, wb = final_weights(reference), final_weights(run)
    # SGD with lr 1: the weights moved by minus the gradient, whose entries are ~1e-3..1e-1;
    # a sum in another order moves them by a few fp32 ulps. A gradient normalised by a rank's
    # own count or a micro-batch's would be off by a factor of 2 or more.
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, f"weights differ by {worst}"
