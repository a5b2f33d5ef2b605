"""Advantage estimators, by name: GAE with a critic, the critic-free group baselines and
REINFORCE++.

Every estimator maps per-token rewards to per-token advantages and returns (targets of the critic):

    fn(rewards [B, T], values [B, T], mask [B, T], *, gamma, lam, group_size)
        -> (advantages [B, T], returns [B, T]), both 0 outside the mask.

`rewards` is InstructGPT's per-token reward (the RM score at the last response token minus beta *
KL at every token), `mask` 1 on response tokens.

  gae   (Schulman et al., 2016) over the critic's values, through the kernel dispatcher
        (`megarlhf.kernels.gae`: C++ on CPU, Triton on CUDA); masked semantics there.
  rloo  (Ahmadian et al., 2024)  A_i = r_i - mean_{j != i} r_j   (leave-one-out baseline)
  grpo  (Shao et al., 2024)      A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
  reinforce           (REINFORCE++, Hu 2025)  A_t = G_t = sum_{s >= t} gamma^(s-t) r_s, the
                      per-token discounted return of the token rewards, then whitened over the
                      whole rollout batch
  reinforce_baseline  (REINFORCE++-baseline)  the group mean b = mean_j r_j of the K sequence
                      rewards is subtracted from response i's last-token reward first (so with
                      gamma = 1, A_t = G_t - b), then the returns, then the batch whitening

For rloo / grpo, r_i is the sequence reward (the sum of response i's token rewards) and the K =
`group_size` samples of a prompt are consecutive rows; the response's advantage is applied to
each of its tokens and the returns are the (zero) values. Simplification, stated: GRPO here keeps
the KL penalty in the reward (as RLOO and InstructGPT do) instead of DeepSeekMath's separate k3
loss term. REINFORCE++'s returns are its `returns` (no critic reads them); OpenRLHF's
reinforce_baseline subtracts the group mean of the RM score alone (before adding the KL), here the
baseline is the mean of the whole sequence reward, the r_i of rloo / grpo. Pure functions; inputs
are not modified.

`ADVANTAGE_ESTIMATORS[name]` says what each needs: `needs_critic` (a critic is built and trained),
`whole_groups` (every sample of a prompt must be present: the caller passes the whole rollout batch,
gathered over data parallelism), `min_group_size`, and `always_whiten` (its advantages are
whitened over the whole rollout batch, all DP ranks, whatever ppo.whiten_advantages says).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megarlhf.algos.ppo import last_token_index
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


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token returns [B, T]: G_t = r_t + gamma * G_{t+1} over the masked rewards (response
    tokens are a prefix of each row), 0 outside the mask. Accumulated in fp64."""
    r = (rewards * mask).double()
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return (out * mask).to(rewards.dtype)


def reinforce_advantages(rewards, values, mask, *, gamma: float, lam: float, group_size: int = 1):
    """REINFORCE++: advantages and returns [B, T] are both the discounted returns (the registry
    entry has them whitened over the batch)."""
    returns = discounted_returns(rewards, mask, gamma)
    return returns, returns.clone()


def reinforce_baseline_advantages(
    rewards, values, mask, *, gamma: float, lam: float, group_size: int
):
    """REINFORCE++-baseline: the discounted returns [B, T] of the token rewards with each group's
    mean sequence reward (K = group_size consecutive rows) subtracted at the last response token;
    returns [B, T] are those of the raw rewards."""
    k = group_size
    if k < 2:
        raise ValueError(f"reinforce_baseline needs k >= 2 samples per prompt, got {k}")
    seq = (rewards * mask).sum(-1).double()
    if seq.numel() % k:
        raise ValueError(f"{seq.numel()} rewards are not groups of {k}")
    baseline = seq.view(-1, k).mean(-1, keepdim=True).expand(-1, k).reshape(-1)
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    shifted = rewards.clone()
    shifted[rows, last] -= torch.where(mask.sum(-1) > 0, baseline, 0.0).to(rewards.dtype)
    return discounted_returns(shifted, mask, gamma), discounted_returns(rewards, mask, gamma)


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
    # Part of the estimator: its advantages are whitened over the whole rollout batch (all DP
    # ranks) even with ppo.whiten_advantages=false.
    always_whiten: bool = False


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_advantages, needs_critic=True, whole_groups=False),
    "rloo": AdvantageEstimator(_group_estimator("rloo"), False, True, min_group_size=2),
    "grpo": AdvantageEstimator(_group_estimator("grpo"), False, True, min_group_size=2),
    "reinforce": AdvantageEstimator(reinforce_advantages, False, False, always_whiten=True),
    "reinforce_baseline": AdvantageEstimator(
        reinforce_baseline_advantages, False, True, min_group_size=2, always_whiten=True
    ),
}
