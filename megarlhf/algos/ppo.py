"""PPO math for RLHF: per-token rewards and score shaping, policy losses by name (with dual-clip),
the rollout importance-sampling correction, the value loss, loss aggregation.

Shapes: every per-token tensor is `[batch, T]` over response positions, with `mask` 1 for response
tokens (0 after EOS and for padding). Functions are pure: inputs are never mutated.

Losses come per token and are reduced by `aggregate(per_token, weights, normalizer)`, with the
per-token weights of the aggregation mode (`token_weights`) and the normalizer computed once for
the whole optimizer step (over every micro-batch and every data-parallel rank) by
`loss_normalizer`. So a micro-batch's loss is already its share of the
step's loss, gradients summed over micro-batches and ranks are the gradients of that loss at any
layout, and no caller rescales a mean. With l_{i,t} the per-token loss of response i (|y_i|
tokens), B responses and N = sum_i |y_i| tokens in the step, and T = generation.max_new_tokens:

    token-mean               sum_{i,t} l_{i,t} / N
    seq-mean-token-sum       sum_i (sum_t l_{i,t}) / B
    seq-mean-token-mean      sum_i (sum_t l_{i,t} / |y_i|) / B
    seq-mean-token-sum-norm  sum_i (sum_t l_{i,t}) / (B * T)      (Dr. GRPO's constant horizon)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megarlhf.kernels import kl_penalty

# ----------------------------------------------------------------------------- rewards


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


def missing_eos_penalties(has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """TRL's missing-EOS penalty [b], an amount subtracted from each response's score: `penalty`
    where the response holds no EOS token (it ran to generation.max_new_tokens), else 0.

    Args:
        has_eos: [b] bool.
        penalty: ppo.missing_eos_penalty.
    """
    return (~has_eos.bool()).to(torch.float32) * penalty


def overlong_penalties(
    lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) [b], an amount subtracted from
    each response's score: 0 up to L_max - L_buf tokens, then linear up to `factor` at L_max:

        factor * clamp((|y| - (L_max - L_buf)) / L_buf, 0, 1)

    Args:
        lengths: [b] response tokens |y| (EOS included).
        max_len: L_max, generation.max_new_tokens.
        buffer_len: L_buf >= 1, ppo.overlong_buffer_len.
        factor: ppo.overlong_penalty_factor.
    """
    excess = lengths.to(torch.float64) - (max_len - buffer_len)
    return (factor * (excess / buffer_len).clamp(0.0, 1.0)).to(torch.float32)


# ----------------------------------------------------------------------------- aggregation

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                     "seq-mean-token-sum-norm")  # fmt: skip


def loss_normalizer(masks: list[torch.Tensor], mode: str, sum_over_dp: Callable) -> float:
    """The denominator of one optimizer step's loss, over all its micro-batches and DP ranks.

    Args:
        masks: [rows, T] response masks of this rank's micro-batches of the step.
        mode: a `LOSS_AGGREGATIONS` name.
        sum_over_dp: sums a list of floats over the data-parallel group.
    Returns:
        token-mean: response tokens; the seq-mean modes: sequences; seq-mean-token-sum-norm:
        sequences * T (Dr. GRPO's constant horizon). At least 1.
    """
    if mode == "token-mean":
        local = sum(float(m.sum()) for m in masks)
    elif mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        local = float(sum(m.shape[0] for m in masks))
    elif mode == "seq-mean-token-sum-norm":
        local = float(sum(m.shape[0] * m.shape[1] for m in masks))
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")
    (total,) = sum_over_dp([local])
    return max(total, 1.0)


def token_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights [b, T] of `aggregate` for a `LOSS_AGGREGATIONS` mode.

    token-mean, seq-mean-token-sum, seq-mean-token-sum-norm: the mask (the normalizer makes the
    difference); seq-mean-token-mean: mask / the row's token count (each response weighs 1).
    """
    mask = mask.float()
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(-1, keepdim=True).clamp_min(1)
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")
    return mask


def aggregate(per_token: torch.Tensor, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss: sum(per_token * weights) / normalizer, any
    layout of the same shape (padded [b, T] or packed [r, width]) giving the same sum."""
    return (per_token * weights).sum() / normalizer


# ----------------------------------------------------------------------------- losses


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip_c: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp -
    old_logp); with dual_clip_c = c > 1 (Ye et al. 2020), where A < 0 the loss is further
    bounded by -c A: min(max(-A r, -A clip(r)), -c A), so a token whose ratio has grown large
    (r > c) under a negative advantage contributes a constant (no gradient) instead of an
    unbounded term. c = 0 is off.

    Returns:
        (loss [b, T], per-token stats {"clipped": 1 where the clipped term was taken,
        "approx_kl": (old_logp - logp)^2 / 2 (k2 between old and new policy), "ratio": r, and
        with dual-clip "dual_clipped": 1 where the -c A bound was taken}), the stats detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipped": (clipped > unclipped).float(),
            "approx_kl": 0.5 * log_ratio**2,
            "ratio": ratio,
        }
    if dual_clip_c > 0:
        bound = -advantages * dual_clip_c
        lower = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        stats["dual_clipped"] = lower.float().detach()
    return loss, stats


# name -> fn(logprobs, old_logprobs, advantages, clip_eps, dual_clip_c) -> (loss [b, T], stats)
POLICY_LOSSES: dict[str, Callable] = {"ppo": clipped_surrogate}


def truncated_is_weights(
    old_logprobs: torch.Tensor, gen_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights [b, T] of the rollout correction (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL"): the tokens were sampled
    from the generation engine's distribution, the PPO ratio is taken against the training
    layout's, so each token's loss is weighted by

        w = min(exp(old_logp - gen_logp), cap)        0 outside the mask, no gradient.

    Args:
        old_logprobs: [b, T] the training-layout log-probs before the update.
        gen_logprobs: [b, T] generation's log-probs of the same tokens.
        mask: [b, T] response tokens.
        cap: C (ppo.rollout_is_cap).
    """
    with torch.no_grad():
        w = torch.exp(old_logprobs - gen_logprobs).clamp(max=cap)
        return w * mask


# ppo.rollout_is name -> fn(old_logprobs, gen_logprobs, mask, cap) -> weights [b, T]; "none" is
# the uncorrected loss.
ROLLOUT_CORRECTIONS: dict[str, Callable] = {"tis": truncated_is_weights}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2) [b, T].

    `clip_range <= 0` disables clipping. Stats (per token, detached): "clipped" where the clipped
    error was the larger.
    """
    err = (values - returns) ** 2
    if clip_range <= 0:
        return 0.5 * err, {"clipped": torch.zeros_like(err).detach()}
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err_clipped = (clipped - returns) ** 2
    return 0.5 * torch.maximum(err, err_clipped), {"clipped": (err_clipped > err).float().detach()}


def entropy_bonus(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """-coef * entropy per token [b, T] (added to the policy loss to encourage exploration)."""
    return -coef * entropy


def ptx_loss(logprobs: torch.Tensor, coef: float, normalizer: float) -> torch.Tensor:
    """PPO-ptx's pretraining term: coef * (-sum of next-token log-probs) / normalizer.

    Args:
        logprobs: [rows, L - 1] log-probs of each PTX row's next tokens.
        coef: InstructGPT's gamma.
        normalizer: next-token predictions in the step's whole PTX batch (all DP ranks).
    """
    nll = -logprobs.sum()
    return coef * nll / normalizer
