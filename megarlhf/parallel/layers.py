"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Each layer holds only its rank's shard; how the full tensor maps to shards is a `ShardSpec`
(megarlhf.parallel.sharding), so layers are built from per-rank sizes and can be uneven.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megarlhf.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim: rank r computes its slice of Y.

    Args:
        in_features: full input width (the input is replicated across TP ranks).
        local_out: this rank's output width.
        group: TP process group (None: not sharded).
        gather_output: all-gather the output to the full width (sizes: per-rank widths).
    """

    def __init__(self, in_features, local_out, group, bias=True, gather_output=False, sizes=None):
        super().__init__()
        self.group, self.gather_output, self.sizes = group, gather_output, sizes
        self.weight = nn.Parameter(torch.empty(local_out, in_features))
        self.bias = nn.Parameter(torch.empty(local_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group, self.sizes)
        return y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim; partial outputs are summed over TP.

    The input is already split (the output of a column-parallel layer); the bias is replicated and
    added once, after the all-reduce.
    """

    def __init__(self, local_in, out_features, group, bias=True):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, local_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary ids) are split evenly over TP ranks.

    Rank r holds ids [r * V_local, (r + 1) * V_local); ids outside its range look up zeros, and the
    all-reduce sums the one non-zero contribution.
    """

    def __init__(self, padded_vocab: int, dim: int, tp_rank: int, tp_size: int, group):
        super().__init__()
        if padded_vocab % tp_size:
            raise ValueError(f"padded vocab {padded_vocab} not divisible by TP size {tp_size}")
        self.group = group
        local = padded_vocab // tp_size
        self.start, self.end = tp_rank * local, (tp_rank + 1) * local
        self.weight = nn.Parameter(torch.empty(local, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local_ids = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)
