"""The spiral classifier's train spec: a residual MLP on points it generates itself.

Nothing here knows about ranks, checkpoints or preemption: the spec says how to build the model,
which of its modules are blocks (sharded one by one), how to score a micro-batch, and which data
to train on. elastic-train does the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elastic_train.config import Config
from elastic_train.spec import ModelContext, TrainSpec

ARMS = 3
"""Classes: one per spiral arm."""
POINTS = 3000
"""Points in the dataset (an epoch)."""
FEATURES = 8
"""x, y and fixed random projections of them (so the first layer has something to mix)."""
WIDTH = 64
DEPTH = 4


class Spirals:
    """`POINTS` noisy points on `ARMS` interleaved spiral arms, labelled by arm.

    A pure function of `seed`: every rank, every restart and every world size sees the same
    items, which is what lets the trainer resume the data order exactly."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        labels = rng.integers(0, ARMS, POINTS)
        radius = rng.uniform(0.05, 1.0, POINTS)
        angle = 3 * math.pi * radius + 2 * math.pi * labels / ARMS
        xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        xy += rng.normal(0, 0.02, xy.shape)
        projection = rng.normal(0, 1, (2, FEATURES - 2))
        features = np.concatenate([xy, np.sin(xy @ projection)], axis=1)
        self.features = torch.from_numpy(features.astype(np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return POINTS

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


class Block(nn.Module):
    """x + MLP(norm(x)): (B, WIDTH) -> (B, WIDTH)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class SpiralNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, ARMS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, FEATURES) -> logits (B, ARMS)."""
        x = self.stem(features)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(ctx: ModelContext) -> nn.Module:
    return SpiralNet()


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the micro-batch's points, and how many there were."""
    features, labels = batch
    return F.cross_entropy(model(features), labels, reduction="sum"), labels.numel()


def dataset(config: Config) -> Spirals:
    return Spirals(config.seed)


SPEC = TrainSpec(name="spiral", build_model=build, loss=loss,
                 blocks=lambda model: model.blocks, dataset=dataset)
