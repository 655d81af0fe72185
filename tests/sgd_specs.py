"""Train specs for tests, importable by torchrun workers when tests/ is on PYTHONPATH."""

from __future__ import annotations

import dataclasses

import torch

from elastic_train.config import OptimConfig
from elastic_train.model import TINY


def _sgd(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Plain SGD: the weights after one step are linear in the gradient, so comparing them
    # compares the gradients (Adam's first step is about sign(g) and would hide a wrong scale).
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)


TINY_SGD = dataclasses.replace(TINY, name="gpt-tiny-sgd", build_optimizer=_sgd)
