"""`ModelOptimizerState`: a model and its optimizer as one DCP `Stateful`.

`get_state_dict`/`set_state_dict` give fully qualified names that do not depend on how the module is
wrapped or sharded, so a checkpoint of an FSDP2 (`fully_shard`) model written by W ranks loads into
the same model sharded over any W' ranks, or into the plain unsharded module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelOptimizerState(Stateful):
    """Model and optimizer state for DCP. The optimizer may be None (model only).

    `load_state_dict` raises (from DCP) if a key or a shape differs: a checkpoint of another model
    never loads silently.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 options: StateDictOptions | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state_dict["model"], options=self.options)
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"], options=self.options)
