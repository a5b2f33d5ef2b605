"""References for `gae`: a plain-Python scalar loop (the independent check in tests) and the
batched reverse loop over time that RLHF codebases usually run (the benchmark's baseline).

Both implement the mask semantics documented in gae.py: only masked-in positions take part, each
bootstrapped by the value of the next masked-in position of its row (0 after the last one).
"""

from __future__ import annotations

import torch


def gae_python(
    rewards: list[list[float]],
    values: list[list[float]],
    mask: list[list[bool]],
    gamma: float,
    lam: float,
) -> tuple[list[list[float]], list[list[float]]]:
    """Scalar Python GAE over nested lists `[batch][T]`; returns (advantages, returns) lists."""
    advs, rets = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask, strict=True):
        T = len(r_row)
        adv, ret = [0.0] * T, [0.0] * T
        valid = [t for t in range(T) if m_row[t]]
        last_adv, next_value = 0.0, 0.0
        for t in reversed(valid):
            delta = r_row[t] + gamma * next_value - v_row[t]
            last_adv = delta + gamma * lam * last_adv
            adv[t], ret[t] = last_adv, last_adv + v_row[t]
            next_value = v_row[t]
        advs.append(adv)
        rets.append(ret)
    return advs, rets


def gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse Python loop over time, vectorized over the batch; all `[batch, T]` fp32."""
    B, T = rewards.shape
    valid = mask.bool()
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    last_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m, v = valid[:, t], values[:, t]
        a = rewards[:, t] + gamma * next_value - v + gamma * lam * last_adv
        adv[:, t] = torch.where(m, a, 0.0)
        ret[:, t] = torch.where(m, a + v, 0.0)
        next_value = torch.where(m, v, next_value)
        last_adv = torch.where(m, a, last_adv)
    return adv, ret
