"""RL statistics over the whole rollout batch when its rows are spread over data-parallel ranks.

Each function does its local work with the pure functions of `stats.py` and one collective over
`ps.dp_group` (none at DP size 1), so every DP rank gets the statistics of the whole batch:

  dp_moments        sum, sum of squares and count of masked x, summed over DP
  dp_whiten         (x - mean) / std with those moments (advantages, RM scores)
  dp_gather_rows    the [B, ...] rows of every DP rank, concatenated in DP order (group baselines
                    need every sample of a prompt; a prompt's samples may sit on two ranks)
  dp_named_sums     {name: float} summed over DP (metrics of the batch, by name)
  dp_max            the largest of one integer over DP (e.g. micro-batch counts to agree on)

Rows are equal in number on every DP rank (the trainer cuts the rollout batch evenly).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.algos.stats import whiten_with_moments
from megarlhf.parallel.scalars import sum_over_dp
from megarlhf.parallel.state import ParallelState


def dp_moments(x: torch.Tensor, mask: torch.Tensor | None, ps: ParallelState) -> list[float]:
    """[sum x, sum x^2, count] over the masked elements of x on every DP rank (mask None: all
    elements), each in fp64."""
    if mask is None:
        d = x.double()
        local = [float(d.sum()), float((d * d).sum()), float(x.numel())]
    else:
        local = [float((x * mask).sum()), float((x * x * mask).sum()), float(mask.sum())]
    return sum_over_dp(local, ps)


def dp_whiten(x: torch.Tensor, mask: torch.Tensor | None, ps: ParallelState) -> torch.Tensor:
    """x whitened with the moments of the whole batch (Bessel-corrected); 0 outside `mask`.

    Args:
        x: [B, T] (or [B] with mask None) this rank's rows.
        mask: [B, T] elements that count, or None for all of x.
    """
    out = whiten_with_moments(x, *dp_moments(x, mask, ps))
    return out if mask is None else out * mask


def dp_gather_rows(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """[dp * B, ...]: every DP rank's rows of x [B, ...], in DP-rank order."""
    full = x.contiguous()
    if ps.dp_group is None:
        return full
    parts = [torch.empty_like(full) for _ in range(ps.dp_size)]
    dist.all_gather(parts, full, group=ps.dp_group)
    return torch.cat(parts)


def my_rows(full: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """This DP rank's rows of a `dp_gather_rows` result."""
    b = full.shape[0] // ps.dp_size
    return full[ps.dp_rank * b : (ps.dp_rank + 1) * b]


def dp_named_sums(values: dict[str, float], ps: ParallelState) -> dict[str, float]:
    """Each value summed over the DP group (values every rank of a replica holds alike)."""
    names = list(values)
    return dict(zip(names, sum_over_dp([values[k] for k in names], ps), strict=True))


def dp_max(n: int, ps: ParallelState) -> int:
    """The largest `n` over the DP group."""
    if ps.dp_group is None:
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.dp_group)
    return int(t)
