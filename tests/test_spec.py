"""The train spec: how `model` names one, what a bad reference says, and the CPU paths of the
per-block options (activation checkpointing, compile) the spec's blocks enable."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from elastic_train import config as cfg
from elastic_train import spec
from elastic_train.distributed import checkpoint_activations
from elastic_train.model import TINY, gpt_loss
from elastic_train.startup import TESTED_TORCH, torch_outside_tested_range

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
    # Every registered name is listed: the built-ins, and any installed project's (the example).
    ("huge", f"model='huge' is not a registered spec; expected one of {', '.join(spec.names())} "
             "or package.module:NAME"),
    ("no_such_pkg.mod:SPEC", "model='no_such_pkg.mod:SPEC': no module named 'no_such_pkg' "
                             "(is it installed or on PYTHONPATH?)"),
    ("elastic_train.model:HUGE", "model='elastic_train.model:HUGE': module "
                                 "'elastic_train.model' has no attribute 'HUGE'"),
    ("test_spec:NOT_A_SPEC", "model='test_spec:NOT_A_SPEC' is a int, expected a TrainSpec (or a "
                             "function of no arguments that returns one)"),
    ("elastic_train.model:GPT", "model='elastic_train.model:GPT' is a class GPT, expected a "
                                "TrainSpec (or a function of no arguments that returns one)"),
])
def test_a_reference_that_names_no_spec_fails_with_one_line(ref: str, message: str):
    with pytest.raises(spec.SpecError) as e:
        spec.resolve(ref)
    assert str(e.value) == message


def test_a_malformed_reference_is_refused_before_anything_is_imported():
    with pytest.raises(cfg.ConfigError, match="model='pkg:' is not a registered spec"):
        cfg.load(None, {"model": "pkg:"})


def grads_of_one_step(checkpointed: bool, compiled: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ctx = spec.ModelContext(cfg.Config(), vocab_size=256)
    model = TINY.build_model(ctx)
    for block in TINY.blocks(model):
        if checkpointed:
            checkpoint_activations(block)
        if compiled:
            block.compile()  # as `distributed.shard` does with parallel.compile
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


def test_pyproject_and_the_sky_setups_install_the_tested_torch_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch{TESTED_TORCH}" in project["dependencies"]
    for task in sorted((ROOT / "sky").glob("*.yaml")):
        for doc in yaml.safe_load_all(task.read_text()):
            if doc and "setup" in doc:
                # The project's own install brings pyproject's torch range.
                assert "pip install -q -e '." in doc["setup"], task.name


@pytest.mark.parametrize("version,inside", [("2.13.0", True), ("2.13.1+cpu", True),
                                            ("2.13.0+cu126", True), ("2.14.0", False),
                                            ("2.12.1", False), ("2.14.0.dev20260101", False),
                                            ("garbage", False)])
def test_a_torch_outside_the_tested_range_is_said_in_one_line(version: str, inside: bool):
    warning = torch_outside_tested_range(version)
    assert (warning is None) == inside
    if warning:
        assert "\n" not in warning and version in warning and TESTED_TORCH in warning


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.timeout(600)
def test_compiled_blocks_keep_names_and_gradients():
    """`parallel.compile` on CPU: each block compiled (inductor), the same parameter names and
    the same gradients as eager, within float tolerance (fused kernels sum in another order)."""
    from torch._dynamo.utils import counters

    plain = grads_of_one_step(False)
    counters.clear()
    compiled = grads_of_one_step(False, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1, "no block was compiled"
    assert plain.keys() == compiled.keys()
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-3, atol=1e-5)
