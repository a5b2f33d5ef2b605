"""Advantage estimators, by name: GAE with a critic, and the critic-free group baselines.

Every estimator maps per-token rewards to per-token advantages and returns (targets of the critic):

    fn(rewards [B, T], values [B, T], mask [B, T], *, gamma, lam, group_size)
        -> (advantages [B, T], returns [B, T]), both 0 outside the mask.

`rewards` is InstructGPT's per-token reward (the RM score at the last response token minus beta *
KL at every token), `mask` 1 on response tokens.

  gae   (Schulman et al., 2016) over the critic's values, through the kernel dispatcher
        (`megarlhf.kernels.gae`: C++ on CPU, Triton on CUDA); masked semantics there.
  rloo  (Ahmadian et al., 2024)  A_i = r_i - mean_{j != i} r_j   (leave-one-out baseline)
  grpo  (Shao et al., 2024)      A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

For rloo / grpo, r_i is the sequence reward (the sum of response i's token rewards) and the K =
`group_size` samples of a prompt are consecutive rows; the response's advantage is applied to
each of its tokens and the returns are the (zero) values. Simplification, stated: GRPO here keeps
the KL penalty in the reward (as RLOO and InstructGPT do) instead of DeepSeekMath's separate k3
loss term. Pure functions; inputs are not modified.

`ADVANTAGE_ESTIMATORS[name]` says what each needs: `needs_critic` (a critic is built and trained),
`whole_groups` (every sample of a prompt must be present: the caller passes the whole rollout batch,
gathered over data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megarlhf.kernels import gae as gae_kernel


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
        raise ValueError(f"unknown estimator {estimator!r}; choose one of rloo, grpo")
    return out.view(-1).to(rewards.dtype)


def gae_advantages(rewards, values, mask, *, gamma: float, lam: float, group_size: int = 1):
    """GAE advantages and returns [B, T] (the kernel's masked semantics)."""
    return gae_kernel(rewards, values, mask, gamma, lam)


def _group_estimator(name: str):
    def fn(rewards, values, mask, *, gamma: float, lam: float, group_size: int):
        """Sequence-level group baseline, broadcast over each response's tokens."""
        adv = group_advantages(rewards.sum(-1), group_size, name)
        return adv[:, None] * mask, values

    fn.__name__ = f"{name}_advantages"
    return fn


@dataclass(frozen=True)
class AdvantageEstimator:
    """One registry entry: the function and what it needs of the trainer."""

    fn: Callable
    # The values are a trained critic's predictions (else zeros, and no critic is built).
    needs_critic: bool
    # Needs every sample of each prompt: computed on the whole rollout batch.
    whole_groups: bool
    # Fewest samples per prompt it works with.
    min_group_size: int = 1


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_advantages, needs_critic=True, whole_groups=False),
    "rloo": AdvantageEstimator(_group_estimator("rloo"), False, True, min_group_size=2),
    "grpo": AdvantageEstimator(_group_estimator("grpo"), False, True, min_group_size=2),
}
