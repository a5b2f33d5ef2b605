"""Critic-free advantages from K samples per prompt: RLOO and GRPO.

Both score whole responses: `rewards` is `[n_prompts * K]`, the K samples of a prompt
consecutive, each the sequence reward (RM score minus beta times the summed per-token KL).

  RLOO (Ahmadian et al., 2024):  A_i = r_i - mean_{j != i} r_j       (leave-one-out baseline)
  GRPO (Shao et al., 2024):      A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

The advantage of a response is applied to each of its tokens. Simplification, stated: GRPO here
keeps the KL penalty in the reward (as RLOO and InstructGPT do) instead of DeepSeekMath's separate
k3 loss term. Pure functions; inputs are not modified.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("rloo", "grpo")


def group_advantages(
    rewards: torch.Tensor, k: int, estimator: str, eps: float = 1e-6
) -> torch.Tensor:
    """Per-response advantages [n * k] of consecutive groups of k rewards [n * k] (k >= 2)."""
    if k < 2:
        raise ValueError(f"group baselines need k >= 2 samples per prompt, got {k}")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {k}")
    r = rewards.double().view(-1, k)
    if estimator == "rloo":
        baseline = (r.sum(-1, keepdim=True) - r) / (k - 1)
        out = r - baseline
    elif estimator == "grpo":
        out = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    return out.view(-1).to(rewards.dtype)
