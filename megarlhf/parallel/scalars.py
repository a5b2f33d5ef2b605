"""Small collectives over one layout's groups for metrics and bookkeeping (not for activations).

Trainers use them to agree on batch sizes, sum per-replica statistics, and share the last
pipeline stage's outputs; each takes the ParallelState explicitly and is a no-op in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.parallel.state import ParallelState


def broadcast_object(obj, ps: ParallelState):
    """Global rank 0's `obj` (any picklable value) on every rank."""
    if ps.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_dp(values: list[float], ps: ParallelState) -> list[float]:
    """Sum over the DP group of values every rank of a replica holds alike (e.g. batch sizes)."""
    t = torch.tensor(values, dtype=torch.float64)
    if ps.dp_group is not None:
        dist.all_reduce(t, group=ps.dp_group)
    return t.tolist()


def sum_over_replicas(values: list[float], ps: ParallelState) -> list[float]:
    """Sum over DP replicas of values held by each replica's last stage, TP rank 0 (the values
    of every other rank are ignored); the result is on every rank."""
    t = torch.tensor(values, dtype=torch.float64)
    if not (ps.is_last_stage and ps.tp_rank == 0):
        t.zero_()
    if ps.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def world_max(x: float, ps: ParallelState) -> float:
    """Maximum of `x` over every rank."""
    t = torch.tensor([x], dtype=torch.float64)
    if ps.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def from_last_stage(t: torch.Tensor | None, shape, ps: ParallelState, dtype=torch.float32):
    """The last pipeline stage's tensor `t` on every stage of this pipeline (others pass None
    and the shape/dtype to receive into)."""
    if ps.pp_size == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=dtype)
    t = t.contiguous()
    dist.broadcast(t, src=ps.pp_ranks[-1], group=ps.pp_group)
    return t
