"""`elastic-train export`: a committed checkpoint's model weights, at any world size it was saved
at, load into a fresh model and equal the trainer's own final weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_util import final_weights, train

from elastic_train.cli import main
from elastic_train.model import GPT, config_for

STEPS = 6


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    train(run, 2, f"--steps={STEPS}", "--checkpoint.every=3", "--data.batch_size=4",
          "--data.seq_len=32")
    return run


def _fresh_model() -> torch.nn.Module:
    return GPT(config_for("tiny", 32, 256))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_of_a_two_rank_checkpoint_loads_into_a_fresh_model_equal_to_the_final_weights(
        two_rank_run: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    assert main(["export", str(two_rank_run / "checkpoints"), "--out", str(out)]) == 0
    exported = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    model = _fresh_model()
    model.load_state_dict(exported)  # strict: every key of the model, nothing else
    final = final_weights(two_rank_run)
    assert set(exported) == set(final)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


def test_export_of_an_earlier_step_differs_from_the_final_one(two_rank_run: Path,
                                                               tmp_path: Path) -> None:
    early, late = tmp_path / "s3.safetensors", tmp_path / "s6.safetensors"
    uri = str(two_rank_run / "checkpoints")
    assert main(["export", uri, "--step", "3", "--out", str(early)]) == 0
    assert main(["export", uri, "--out", str(late)]) == 0
    a, b = load_file(early), load_file(late)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_shard_is_refused_before_anything_is_written(two_rank_run: Path,
                                                               tmp_path: Path, capsys) -> None:
    run = tmp_path / "copy"
    shutil.copytree(two_rank_run / "checkpoints", run)
    shard = next((run / "step_00000006").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern flipped
    shard.write_bytes(bytes(data))
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "crc32" in err and shard.name in err and "\n" not in err.strip()
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_a_step_that_is_not_committed_is_one_line(two_rank_run: Path, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["export", str(two_rank_run / "checkpoints"), "--step", "4", "--out",
                 str(out)]) == 1
    assert "no committed step 4" in capsys.readouterr().err
    assert not out.exists()
