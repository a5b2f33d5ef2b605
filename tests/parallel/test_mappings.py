"""Paired TP collectives: forward and backward of each against hand-computed values."""

import torch
import torch.distributed as dist

from megarlhf.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from tests.dist import run_ranks


def _collectives(rank, world):
    g = dist.group.WORLD
    out = {}
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    copy_to_tensor_parallel_region(x, g).mul(rank + 1).sum().backward()
    out["copy_fwd_grad"] = x.grad.clone()  # backward all-reduces: sum of (r+1) over ranks
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = reduce_from_tensor_parallel_region(x, g)
    (y * (rank + 1)).sum().backward()
    out["reduce_fwd"], out["reduce_grad"] = y.detach(), x.grad.clone()
    full = torch.arange(10.0).view(2, 5).requires_grad_()
    sizes = [3, 2]  # uneven split
    part = scatter_to_tensor_parallel_region(full, g, sizes)
    (part * (rank + 1)).sum().backward()
    out["scatter"], out["scatter_grad"] = part.detach(), full.grad.clone()
    mine = torch.full((2, sizes[rank]), float(rank), requires_grad=True)
    gathered = gather_from_tensor_parallel_region(mine, g, sizes)
    (gathered * torch.arange(5.0)).sum().backward()
    out["gather"], out["gather_grad"] = gathered.detach(), mine.grad.clone()
    return out


def test_paired_collectives_forward_and_backward():
    r0, r1 = run_ranks(_collectives, 2, timeout=120)
    for r, res in enumerate((r0, r1)):
        assert torch.equal(res["copy_fwd_grad"], torch.full((2, 3), 3.0))
        assert torch.equal(res["reduce_fwd"], torch.full((2, 3), 3.0))
        assert torch.equal(res["reduce_grad"], torch.full((2, 3), float(r + 1)))
        assert torch.equal(res["gather"], torch.tensor([[0.0, 0, 0, 1, 1]] * 2))
        # the gather's backward keeps this rank's slice of the gradient
        assert torch.equal(
            res["gather_grad"], torch.arange(5.0)[[0, 1, 2] if r == 0 else [3, 4]].expand(2, -1)
        )
    assert torch.equal(r0["scatter"], torch.tensor([[0.0, 1, 2], [5, 6, 7]]))
    assert torch.equal(r1["scatter"], torch.tensor([[3.0, 4], [8, 9]]))
    # scatter's backward all-gathers: grad is 1 on rank 0's columns and 2 on rank 1's
    expect = torch.tensor([[1.0, 1, 1, 2, 2]] * 2)
    assert torch.equal(r0["scatter_grad"], expect) and torch.equal(r1["scatter_grad"], expect)


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 4)
    for fn in (copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region):
        assert fn(x, None) is x
    assert scatter_to_tensor_parallel_region(x, None) is x
    assert gather_from_tensor_parallel_region(x, None) is x
