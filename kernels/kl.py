"""Per-token estimators of KL(policy || reference) from log-probs of tokens sampled from the policy
(J. Schulman, "Approximating KL Divergence", 2020).

With x ~ policy and r = ref(x) / policy(x), i.e. log r = ref_logp - logp:

    k1 = -log r                 = logp - ref_logp          unbiased, high variance, can be < 0
    k2 = (log r)^2 / 2                                      biased, low variance, >= 0
    k3 = (r - 1) - log r                                    unbiased, low variance, >= 0

Clamping: only k3 exponentiates, so only k3 clamps: log r is clamped to [-clamp, clamp] (default
20, so r <= e^20 ~ 4.9e8 and no fp32 overflow) before the formula; where the clamp is active the
gradient through log r is 0. k1 and k2 are polynomials of finite inputs and are not clamped.

k3 = expm1(log r) - log r is evaluated by its Taylor series (log r)^2 / 2 + (log r)^3 / 6 + ...
when |log r| < 0.1, where the subtraction would cancel: fp32 relative error stays ~1e-6 there.

All functions are elementwise on `[batch, seq]` (any shape), return fp32 or the input dtype, and
do not mutate their inputs.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp, `[...]`."""
    return logp - ref_logp


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - ref_logp)^2 / 2, `[...]`."""
    d = logp - ref_logp
    return 0.5 * d * d


def k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 20.0) -> torch.Tensor:
    """k3 = exp(log r) - 1 - log r with log r = clamp(ref_logp - logp, -clamp, clamp), `[...]`."""
    x = (ref_logp - logp).clamp(-clamp, clamp)
    small = x.abs() < 0.1
    xs = torch.where(small, x, 0.0)  # keep the series branch finite where it is not used
    series = xs * xs * (0.5 + xs * (1 / 6 + xs * (1 / 24 + xs * (1 / 120))))
    return torch.where(small, series, torch.expm1(x) - x)


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float = 20.0
) -> torch.Tensor:
    """Per-token KL estimate `[...]` by name ("k1", "k2" or "k3"); `clamp` applies to k3 only."""
    if estimator == "k1":
        return k1(logp, ref_logp)
    if estimator == "k2":
        return k2(logp, ref_logp)
    if estimator == "k3":
        return k3(logp, ref_logp, clamp)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
