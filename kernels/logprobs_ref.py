"""Pure-torch reference of `logprobs_from_logits`: the same vocab-parallel stages written plainly,
differentiated by autograd. It materializes the fp32 tempered logits of the shard (that is what
the fused kernels avoid) and exists to check them, not to be fast.

Stages (see logprobs.py): local max -> all-reduce MAX -> local sum of exp, entropy numerator and
target logit -> one all-reduce SUM of the three packed. The MAX only shifts for stability and is
not differentiated; the SUM is forward all-reduce / backward identity (each TP rank computes the
same loss, so each rank's shard receives the gradient of that one loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce SUM over the group. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) per position, both `[...]` fp32 (fp64 for fp64 logits), 0 at ignored labels.

    Args:
        logits: `[..., V_local]`, this rank's vocabulary shard.
        labels: `[...]` global ids or `ignore_index`.
        tp_group: TP group or None.
        temperature: > 0.
    """
    V = logits.shape[-1]
    sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
    rank = dist.get_rank(tp_group) if sharded else 0
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    # Stage 1-2: local max, all-reduce MAX (no gradient: any shift gives the same result).
    m = z.detach().amax(dim=-1)
    if sharded:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    d = z - m[..., None]
    e = torch.exp(d)
    # Stage 3: local sums; 0 * -inf on padded columns would be NaN, so those add exactly 0.
    s = e.sum(dim=-1)
    w = (e * torch.where(e > 0, d, 0.0)).sum(dim=-1)
    keep = labels != ignore_index
    local = labels.long() - rank * V
    here = keep & (local >= 0) & (local < V)
    zy = torch.where(here, z.gather(-1, local.clamp(0, V - 1)[..., None])[..., 0], 0.0)
    # Stage 4: one all-reduce SUM of the packed statistics.
    packed = torch.stack([s, w, zy])
    if sharded:
        packed = _AllReduceSumIdentityBackward.apply(packed, tp_group)
    s, w, zy = packed.unbind(0)
    logp = zy - m - torch.log(s)
    ent = torch.log(s) - w / s
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
