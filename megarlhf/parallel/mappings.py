"""The paired autograd collectives of tensor parallelism (Megatron's `mappings.py`).

Each function is named by what it does in forward; backward does the mirror:

| function                                   | forward                 | backward                |
|--------------------------------------------|-------------------------|-------------------------|
| copy_to_tensor_parallel_region             | identity                | all-reduce SUM          |
| reduce_from_tensor_parallel_region         | all-reduce SUM          | identity                |
| scatter_to_tensor_parallel_region          | split last dim, keep own| all-gather last dim     |
| gather_from_tensor_parallel_region         | all-gather last dim     | split last dim          |

The group is always an explicit argument; on a None group (TP size 1) every function is the
identity. Uneven last-dim splits are supported by passing the per-rank sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _sizes(x: torch.Tensor, group, sizes) -> list[int]:
    world = dist.get_world_size(group)
    if sizes is None:
        if x.shape[-1] % world:
            raise ValueError(f"last dim {x.shape[-1]} not divisible by TP size {world}")
        return [x.shape[-1] // world] * world
    return list(sizes)


def _split_last(x: torch.Tensor, group, sizes) -> torch.Tensor:
    rank = dist.get_rank(group)
    s = _sizes(x, group, sizes)
    return x.narrow(-1, sum(s[:rank]), s[rank]).contiguous()


def _gather_last(x: torch.Tensor, group, sizes) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    if sizes is None or len(set(sizes)) == 1:
        bufs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(bufs, x, group=group)
        return torch.cat(bufs, dim=-1)
    # Uneven slices: collectives need equal sizes, so pad to the largest and trim after.
    big = max(sizes)
    padded = torch.nn.functional.pad(x, (0, big - x.shape[-1]))
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[..., :s] for b, s in zip(bufs, sizes, strict=True)], dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _split_last(x, group, sizes)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group, ctx.sizes), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _gather_last(x, group, sizes)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group, ctx.sizes), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel op)."""
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel op)."""
    return x if group is None else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group, sizes=None) -> torch.Tensor:
    """Keep this rank's slice of the last dim forward; all-gather the gradient backward.

    Args:
        sizes: per-rank slice sizes (uneven splits); None means equal slices.
    """
    return x if group is None else _ScatterToRegion.apply(x, group, sizes)


def gather_from_tensor_parallel_region(x: torch.Tensor, group, sizes=None) -> torch.Tensor:
    """All-gather the last dim forward; keep this rank's slice of the gradient backward.

    Args:
        sizes: per-rank slice sizes (uneven splits); None means all ranks hold x's size.
    """
    return x if group is None else _GatherFromRegion.apply(x, group, sizes)
