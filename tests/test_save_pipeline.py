"""An async save with deferred staging serialises the live state once, lets training go on, and
only then talks to storage: a storage outage holds up the upload, never the optimizer's fence,
and the checkpoint still holds the state from the moment of the save."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from checkpointing import CheckpointConfig, CheckpointManager, ModelOptimizerState


def model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def wait_until(predicate: Callable[[], bool], limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "the upload never reached storage"
        time.sleep(0.05)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(2, 256)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_an_outage_during_the_upload_does_not_hold_the_fence(s3_proxy) -> None:
    proxy, uri = s3_proxy.proxy, s3_proxy.url("run")
    model, opt = model_and_optimizer()
    step(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CheckpointConfig(staging="deferred", retry_timeout_s=60)
    with CheckpointManager(uri, config, storage_options=s3_proxy.storage_options) as manager:
        # Every write to the step fails until the rule is cleared: the upload cannot finish.
        proxy.inject("error", status=503, count=None, match=r"PUT .*step_00000001")
        manager.save(1, {"app": ModelOptimizerState(model, opt)})
        manager.maybe_wait_for_staging()  # returns once the state is serialised
        assert manager.save_in_flight
        step(model, opt)  # the fence has nothing left to wait for
        assert manager.save_in_flight
        wait_until(lambda: bool(proxy.fired))  # the upload reached storage and was refused
        assert manager.save_in_flight
        proxy.clear()
        manager.wait()
        assert manager.latest_step() == 1 and manager.verify(1).ok
        fresh, fresh_opt = model_and_optimizer(seed=1)
        manager.load({"app": ModelOptimizerState(fresh, fresh_opt)})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert not torch.equal(value, model.state_dict()[key]), key


def test_serialising_a_save_sends_no_request_so_an_outage_cannot_hold_the_fence(s3_proxy) -> None:
    proxy, uri = s3_proxy.proxy, s3_proxy.url("run")
    model, opt = model_and_optimizer()
    step(model, opt)
    config = CheckpointConfig(staging="deferred", retry_timeout_s=60)
    with CheckpointManager(uri, config, storage_options=s3_proxy.storage_options) as manager:
        proxy.inject("error", status=503, count=None)  # every request fails, retried for 60 s
        manager.save(1, {"app": ModelOptimizerState(model, opt)})
        # Serialising asks storage nothing (DCP's "does .metadata exist?" included), so the
        # fence opens while every request would still be retried.
        assert manager.maybe_wait_for_staging(timeout_s=30)
        step(model, opt)
        proxy.clear()
        manager.wait()
        assert manager.latest_step() == 1
