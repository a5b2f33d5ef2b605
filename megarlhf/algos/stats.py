"""Masked statistics over response tokens: mean, variance, whitening, explained variance.

All functions take a `[batch, T]` tensor and a same-shape mask (non-zero = counted), return new
tensors, and never mutate their inputs. Reductions are over every masked-in element.
"""

from __future__ import annotations

import math

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty)."""
    return masked_sum(x, mask) / mask.sum().clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over mask; Bessel-corrected when `unbiased` (and more than one element)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp_min(1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over mask (mean added back when not `shift_mean`); 0 outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over mask (1: perfect critic, <= 0: useless)."""
    var_ret = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_ret.clamp_min(1e-12)


def whiten_with_moments(
    x: torch.Tensor,
    total: float,
    total_sq: float,
    count: float,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / std with mean and variance from sums over a larger population.

    For statistics over every data-parallel rank's batch: each rank sums x and x^2 locally, the
    sums are all-reduced, and each rank whitens its own x with the global moments.

    Args:
        x: any shape; total, total_sq, count: sum of x, sum of x^2 and number of elements of the
            whole population (which x is part of).
        unbiased: Bessel-correct the variance (when count > 1).
    """
    n = max(count, 1.0)
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    if unbiased and count > 1:
        var *= count / (count - 1)
    return (x - mean) * (1.0 / math.sqrt(var + eps))
