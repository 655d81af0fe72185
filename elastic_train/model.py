"""A small GPT: a decoder-only transformer, read top to bottom.

Built bottom-up: attention, MLP, a block of both, then the model. No distributed code here: the
trainer shards the blocks with FSDP2 through the specs at the end of this file.
Shapes in comments use B (batch), T (sequence), C (width), H (heads), V (vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from elastic_train.spec import ModelContext, TrainSpec


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 128
    """Longest sequence the position embedding covers."""
    vocab_size: int = 256


# Named sizes (parameters with the byte vocabulary): tiny 0.8M, small 10.7M, base 85M.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384},
    "base": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}


def config_for(size: str, block_size: int, vocab_size: int) -> GPTConfig:
    if size not in SIZES:
        raise ValueError(f"model={size!r} is not a known size; expected one of {', '.join(SIZES)}")
    return GPTConfig(**SIZES[size], block_size=block_size, vocab_size=vocab_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position embedding
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # Untied head: FSDP2 shards the embedding and the head separately without special cases.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer). Seed before calling."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm weights and biases keep their defaults (1 and 0)
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj.weight") or \
                name.endswith("down.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# The built-in sizes as train specs (registered under `elastic_train.specs` in pyproject.toml)
# ---------------------------------------------------------------------------------------------


def gpt_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the micro-batch's tokens, and their count."""
    inputs, targets = batch
    logits = model(inputs)
    loss_sum = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               reduction="sum")
    return loss_sum, targets.numel()


def gpt_spec(size: str) -> TrainSpec:
    """The GPT of a named size, on prepared token shards (`data.seq_len` is its block size)."""

    def build(ctx: ModelContext) -> nn.Module:
        if ctx.vocab_size is None:
            raise ValueError(f"the {size} GPT trains on prepared token shards; set data.uri")
        return GPT(config_for(size, ctx.config.data.seq_len, ctx.vocab_size))

    return TrainSpec(name=f"gpt-{size}", build_model=build, loss=gpt_loss,
                     blocks=lambda model: model.blocks, init_weights=init_gpt)


def init_gpt(model: nn.Module) -> None:
    """Initialise a GPT allocated from the meta device: every submodule's own defaults (LayerNorm
    ones and zeros, Linear biases), then the GPT-2 init of its matrices."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.reset_parameters()


TINY = gpt_spec("tiny")
SMALL = gpt_spec("small")
BASE = gpt_spec("base")
