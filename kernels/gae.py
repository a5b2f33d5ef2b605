"""Generalized advantage estimation (Schulman et al., 2016) over masked response tokens.

Mask semantics, per row of `[batch, T]`:
  - Only positions with mask set (the response tokens) take part. Call them t_1 < ... < t_n.
  - Each is bootstrapped by the value of the *next masked-in* position, and the value after the
    last one is 0 (the episode ends with the response):
        delta_i = r[t_i] + gamma * V[t_{i+1}] - V[t_i],   V[t_{n+1}] = 0
        A[t_i]  = delta_i + gamma * lam * A[t_{i+1}],     A[t_{n+1}] = 0
        R[t_i]  = A[t_i] + V[t_i]
    So a hole inside the response (a masked-out position between two response tokens) is skipped
    as if it were not there: it neither receives nor passes on advantage, and no discount is
    applied for it.
  - Masked-out positions get advantage 0 and return 0; their rewards and values are ignored
    (put the sequence-level reward on the last response token, not after it).
  - A row with no masked-in position is all zeros.

`rewards`, `values` are any float dtype (computed in fp32); `mask` is bool or numeric (non-zero
means in). Outputs are fp32 and not differentiable (GAE produces targets). Inputs are not mutated.

Backends: C++ scan (csrc/gae.cpp) on CPU, Triton on CUDA, and a vectorized torch scan everywhere
else: next-valid values by a reverse cumulative minimum over indices, then the linear recurrence
A_t = a_t * A_{t+1} + b_t as a log2(T)-step Hillis-Steele scan.
"""

from __future__ import annotations

import torch
from megarlhf.kernels._dispatch import select_backend


def gae_torch(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized (loop-free over T, log2(T) steps) GAE; fp32 `[B, T]` inputs, bool `valid`."""
    B, T = rewards.shape
    dev = rewards.device
    # Index of the next valid position strictly after t (T if none): reverse running minimum.
    idx = torch.where(valid, torch.arange(T, device=dev), T).expand(B, T)
    suffix_min = idx.flip(1).cummin(1).values.flip(1)
    next_idx = torch.cat([suffix_min[:, 1:], torch.full((B, 1), T, device=dev)], dim=1)
    v_pad = torch.cat([values, values.new_zeros(B, 1)], dim=1)
    next_value = v_pad.gather(1, next_idx)
    # A_t = a_t * A_{t+1} + b_t: valid t: a = gamma * lam, b = delta_t; holes: a = 1, b = 0.
    a = torch.where(valid, gamma * lam, 1.0).to(rewards.dtype)
    b = torch.where(valid, rewards + gamma * next_value - values, 0.0)
    shift = 1
    while shift < T:
        b_next = b.clone()
        b_next[:, : T - shift].addcmul_(a[:, : T - shift], b[:, shift:])
        a_next = a.clone()
        a_next[:, : T - shift].mul_(a[:, shift:])
        a, b = a_next, b_next
        shift *= 2
    adv = torch.where(valid, b, 0.0)
    return adv, torch.where(valid, b + values, 0.0)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns over the masked-in positions (semantics in the module docstring).

    Args:
        rewards: `[batch, T]` per-token rewards (KL penalty plus the sequence reward).
        values: `[batch, T]` critic values.
        mask: `[batch, T]` response mask (bool, or non-zero = in).
        gamma: discount.
        lam: GAE lambda.
        backend: force "cpp", "triton" or "torch" (default: fastest for the device).

    Returns:
        (advantages, returns), each `[batch, T]` fp32, 0 where mask is 0.
    """
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"rewards, values, mask must all be [batch, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    r = rewards.detach().float().contiguous()
    v = values.detach().float().contiguous()
    valid = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    name = select_backend(r.device, backend)
    if name == "cpp":
        return tuple(torch.ops.megarlhf.gae(r, v, valid, float(gamma), float(lam)))
    if name == "triton":
        from megarlhf.kernels import gae_triton

        return gae_triton.gae(r, v, valid, gamma, lam)
    return gae_torch(r, v, valid, gamma, lam)
