"""Exponential moving average of a model stage's weights (InstructGPT keeps one of the PPO actor,
decay 0.992, and evaluates it).

Each rank averages its own stage / TP shard in fp32: ema <- decay * ema + (1 - decay) * w, after
every optimizer step. Under ZeRO 0/1/2 the module holds whole (bf16 or fp32) parameters on every
DP rank, so every DP rank keeps the same average; ZeRO-3 is not supported (the PPO config
refuses it). The average is saved as its own model-shard directory (any-layout loadable).
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 moving average of `model`'s trained parameters (this rank's shard), starting at their
    values.

    Args:
        model: the stage (e.g. DeepSpeed's `engine.module`).
        decay: weight of the old average per update, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.decay = model, decay
        # Frozen parameters (LoRA's base) never move, so their average is themselves: only what
        # trains is averaged (and saved; a LoRA EMA directory names the base like the actor's).
        self.shadow = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current (trained) weights into the average."""
        for n, p in self.model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights in the model's dtype (what a checkpoint stores)."""
        params = dict(self.model.named_parameters())
        return {n: t.to(params[n].dtype) for n, t in self.shadow.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        for n, t in weights.items():
            self.shadow[n].copy_(t.float())
