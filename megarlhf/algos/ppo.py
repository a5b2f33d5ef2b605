"""PPO math for RLHF: per-token rewards, clipped policy and value losses, entropy bonus.

Shapes: every per-token tensor is `[batch, T]` over response positions, with `mask` 1 for response
tokens (0 after EOS and for padding). Functions are pure: inputs are never mutated.
"""

from __future__ import annotations

import torch

from megarlhf.algos.stats import masked_mean
from megarlhf.kernels import kl_penalty


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [batch] of each row's last masked-in position (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (positions + 1)).argmax(-1)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstructGPT's reward: the RM score at the last response token, minus beta * KL per token.

    Args:
        scores: [batch] reward-model scores of the whole responses.
        logprobs, ref_logprobs: [batch, T] policy / SFT-reference log-probs of the sampled tokens.
        mask: [batch, T] response tokens.
        kl_coef: beta.
        estimator: "k1" (InstructGPT), "k2" or "k3" (megarlhf.kernels).
        score_clip: clip scores to [-c, c] when > 0.
    Returns:
        (rewards [batch, T], kl [batch, T] per-token estimate, non_score_reward [batch, T] =
        -beta * kl), all 0 outside the mask.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    non_score = -kl_coef * kl
    if score_clip > 0:
        scores = scores.clamp(-score_clip, score_clip)
    last = last_token_index(mask)
    has_tokens = mask.sum(-1) > 0
    bonus = torch.zeros_like(non_score)
    bonus[torch.arange(mask.shape[0], device=mask.device), last] = torch.where(
        has_tokens, scores.to(bonus.dtype), 0.0
    )
    return non_score + bonus, kl, non_score


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    Returns:
        (loss, {"clipfrac": fraction of tokens where the clipped term was taken,
                "approx_kl": mean of (old_logp - logp)^2 / 2 (k2 between old and new policy),
                "ratio": mean ratio}).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (clip(V, V_old +- c) - R)^2).

    `clip_range <= 0` disables clipping.
    """
    err = (values - returns) ** 2
    if clip_range > 0:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        err_clipped = (clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        frac = masked_mean((err_clipped > err).float(), mask)
    else:
        loss = 0.5 * masked_mean(err, mask)
        frac = torch.zeros(())
    return loss, {"value_clipfrac": frac.detach()}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """-coef * mean entropy (added to the policy loss to encourage exploration)."""
    return -coef * masked_mean(entropy, mask)
