"""The example user project (examples/spiral: a classifier, not a GPT, on data it generates)
trains under real torchrun at two world sizes and resumes exactly. Its own chaos test
(examples/spiral/tests, through the `elastic_chaos` plugin) runs in the same suite."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torchrun_util import final_weights, steps, train

SPIRAL = Path(__file__).resolve().parent.parent / "examples" / "spiral"
STEPS = 20
COMMON = (f"--config={SPIRAL / 'spiral.toml'}", f"--steps={STEPS}", "--checkpoint.every=10",
          "--data.batch_size=24", "--data.micro_batch=5", "--optim.warmup_steps=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run of the example."""
    run = tmp_path_factory.mktemp("spiral") / "w2"
    train(run, 2, *COMMON, pythonpath=SPIRAL)
    return run


def resume_from_step_10(reference: Path, run: Path, world: int) -> list[dict]:
    step10 = Path("checkpoints") / "step_00000010"
    shutil.copytree(reference / step10, run / step10)
    out = train(run, world, *COMMON, pythonpath=SPIRAL)
    assert "training spiral" in out.stdout and "from step 10" in out.stdout
    return steps(run)


def test_the_example_learns_its_task(reference: Path):
    losses = [r["loss"] for r in steps(reference)]
    assert len(losses) == STEPS
    # 20 steps from a random start: below chance (ln 3 for three arms) and falling.
    assert sum(losses[-5:]) / 5 < math.log(3)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_the_example_resumed_at_the_same_world_size_is_bit_identical(
    reference: Path, tmp_path: Path
):
    resumed = resume_from_step_10(reference, tmp_path / "run", 2)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in steps(reference)[10:]]
    wa, wb = final_weights(reference), final_weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_example_resumed_at_one_rank_sees_the_same_data_and_agrees(
    reference: Path, tmp_path: Path
):
    resumed = resume_from_step_10(reference, tmp_path / "run", 1)
    ref = steps(reference)[10:]
    assert [r["step"] for r in resumed] == list(range(11, STEPS + 1))
    assert [r["world_size"] for r in resumed] == [1] * (STEPS - 10)
    assert [r["batch_digest"] for r in resumed] == [r["batch_digest"] for r in ref]
    for a, b in zip(ref, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    wa, wb = final_weights(reference), final_weights(tmp_path / "run")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
