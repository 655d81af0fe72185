"""The train spec: how `model` names one, what a bad reference says, and the CPU paths of the
per-block options (activation checkpointing) the spec's blocks enable."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from elastic_train import config as cfg
from elastic_train import spec
from elastic_train.distributed import checkpoint_activations
from elastic_train.model import TINY, gpt_loss

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def make_tiny() -> spec.TrainSpec:
    return dataclasses.replace(TINY, name="made")


NOT_A_SPEC = 42


@pytest.mark.parametrize("ref,name", [("tiny", "gpt-tiny"), ("small", "gpt-small"),
                                      ("base", "gpt-base"),
                                      ("elastic_train.model:TINY", "gpt-tiny"),
                                      ("test_spec:make_tiny", "made")])
def test_a_registered_name_or_module_attribute_resolves_to_its_spec(ref: str, name: str):
    assert spec.resolve(ref).name == name
    assert cfg.load(None, {"model": ref}).model == ref


def test_the_built_in_sizes_are_registered_as_entry_points_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"][spec.ENTRY_POINT_GROUP] == spec.BUILTIN


@pytest.mark.parametrize("ref,message", [
    ("huge", "model='huge' is not a registered spec; expected one of base, small, tiny or "
             "package.module:NAME"),
    ("no_such_pkg.mod:SPEC", "model='no_such_pkg.mod:SPEC': no module named 'no_such_pkg' "
                             "(is it installed or on PYTHONPATH?)"),
    ("elastic_train.model:HUGE", "model='elastic_train.model:HUGE': module "
                                 "'elastic_train.model' has no attribute 'HUGE'"),
    ("test_spec:NOT_A_SPEC", "model='test_spec:NOT_A_SPEC' is a int, expected a TrainSpec"),
])
def test_a_reference_that_names_no_spec_fails_with_one_line(ref: str, message: str):
    with pytest.raises(spec.SpecError) as e:
        spec.resolve(ref)
    assert str(e.value) == message


def test_a_malformed_reference_is_refused_before_anything_is_imported():
    with pytest.raises(cfg.ConfigError, match="model='pkg:' is not a registered spec"):
        cfg.load(None, {"model": "pkg:"})


def grads_of_one_step(checkpointed: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ctx = spec.ModelContext(cfg.Config(), vocab_size=256)
    model = TINY.build_model(ctx)
    if checkpointed:
        for block in TINY.blocks(model):
            checkpoint_activations(block)
    tokens = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))
    loss, count = gpt_loss(model, (tokens[:, :-1], tokens[:, 1:]))
    assert count == 3 * 32
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_names_and_gradients():
    plain, recomputed = grads_of_one_step(False), grads_of_one_step(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)
