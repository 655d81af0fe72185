"""Resharding across world sizes with real torchrun ranks, FSDP2 over a gloo CPU mesh.

Three launches cover 2->3, 3->2 and (in this process, plain module) 2->1: 2 ranks train and save
asynchronously while training goes on; 3 ranks load that, check it, train on and save; 2 ranks
load the 3-rank checkpoint and check it. Every model and optimizer tensor must be torch.equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_workers import Trainer, assert_same, build_model, full_state, run_ranks, train_steps

from checkpointing import CheckpointManager, ModelOptimizerState

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    a, b = tmp_path_factory.mktemp("w2"), tmp_path_factory.mktemp("w3")
    run_ranks(2, "train_save", {"uri": f"file://{a}/ckpt", "out": str(a), "steps": 8,
                                "every": 4})
    run_ranks(3, "train_save", {"uri": f"file://{b}/ckpt", "out": str(b), "steps": 4, "every": 2,
                                "check": {"uri": f"file://{a}/ckpt", "out": str(a), "step": 4}})
    run_ranks(2, "load_check", {"uri": f"file://{b}/ckpt", "out": str(b), "step": 8})
    return {"a": a, "b": b}


def test_async_save_overlaps_training_and_commits_every_save(runs):
    for work, world in ((runs["a"], 2), (runs["b"], 3)):
        report = json.loads((work / f"train_save_{world}.json").read_text())
        assert report["metrics"]["committed"] == 2, report
        assert report["metrics"]["failed"] == 0, report
        assert report["steps_during_save"] >= 1, report  # the loop went on during an upload


def test_two_rank_checkpoint_loads_exactly_on_three_ranks(runs):
    result = json.loads((runs["a"] / "load_check_3_4.json").read_text())
    assert result["tensors"] >= 3 * 14, result  # 14 params, each with 2 AdamW moments


def test_three_rank_checkpoint_loads_exactly_on_two_ranks(runs):
    result = json.loads((runs["b"] / "load_check_2_8.json").read_text())
    assert result["tensors"] >= 3 * 14, result


def test_two_rank_fsdp_checkpoint_loads_into_a_plain_module_in_one_process(runs):
    model = build_model(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(-1, "other")
    with CheckpointManager(f"file://{runs['a']}/ckpt") as manager:
        assert manager.load({"app": ModelOptimizerState(model, opt), "trainer": trainer}) == 8
    expected = torch.load(runs["a"] / "expected_8.pt", weights_only=False)
    assert assert_same(expected["state"], full_state(model, opt)) >= 3 * 14
    assert trainer.state_dict() == expected["trainer"]
    train_steps(model, opt, 9, 1)
