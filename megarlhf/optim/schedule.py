"""The learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch

from megarlhf.config.optim import OptimConfig


def warmup_cosine_lr(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup reaches `lr` at step `warmup_steps - 1` (the first step already moves, with
    lr / warmup_steps); the cosine then runs `decay_steps` steps and stays at `min_lr` after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(step - warmup_steps, decay_steps) / max(decay_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """`torch.optim.lr_scheduler.LambdaLR` over `warmup_cosine_lr` (stepped by DeepSpeed)."""
    decay = optim.decay_steps or max(total_steps - optim.warmup_steps, 1)

    def factor(step: int) -> float:
        lr = warmup_cosine_lr(
            step,
            lr=optim.lr,
            min_lr=optim.min_lr,
            warmup_steps=optim.warmup_steps,
            decay_steps=decay,
        )
        return lr / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
