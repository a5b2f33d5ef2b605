"""Tensor-parallel layers: column- and row-parallel linears (optionally with a low-rank adapter,
LoRA) and the vocab-parallel embedding.

Each layer holds only its rank's shard; how the full tensor maps to shards is a `ShardSpec`
(megarlhf.parallel.sharding), so layers are built from per-rank sizes and can be uneven.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megarlhf.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)


class LoRAAdapter(nn.Module):
    """The low-rank update `scale * B A drop(x)` of one TP linear, sharded like its base weight W.

    Column-parallel W [out/tp, in] (input replicated): A [r, in] replicated, B [out/tp, r] split
    like W's rows; the update is this rank's slice of the output. Row-parallel W [out, in/tp]
    (input split): A [r, in/tp] split like W's columns, B [out, r] replicated; the partial
    products B A_t x_t are summed by the base output's all-reduce (still one collective forward).

    The replicated factor reaches its matmul through `copy_to_tensor_parallel_region` (identity
    forward, all-reduce of its gradient backward): each rank's gradient of it is only its share
    of the sum (column: over its output rows; row: over its input slice), and the all-reduce
    makes it the full gradient, identical on every rank, as at TP=1. That costs one [r, in] (or
    [out, r]) all-reduce per backward, nothing forward.

    Dropout on the adapter input only: a column-parallel input is replicated, so it takes the
    default stream (the same mask on every TP rank); a row-parallel input is sharded, so it takes
    the TP stream `rng.fork()` (a different mask per rank, as attention dropout does).

    Args:
        rank: r.
        local_in, local_out: this rank's width of A's input and B's output.
        scale: alpha / r.
        dropout: probability on the adapter input.
        group: TP process group (None: not sharded).
        split_input: row-parallel (A sharded, B replicated) instead of column-parallel.
        rng: the model's TP-stream tracker (row-parallel dropout only).
    """

    def __init__(self, rank, local_in, local_out, scale, dropout, group, split_input, rng=None):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, local_in))
        self.b = nn.Parameter(torch.empty(local_out, rank))
        self.scale, self.group, self.split_input, self.rng = scale, group, split_input, rng
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Off: the layer computes its base weight alone (`megarlhf.model.lora.adapters_disabled`).
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None and self.training:
            sharded = self.split_input and self.rng is not None
            with self.rng.fork() if sharded else contextlib.nullcontext():
                x = self.dropout(x)
        a, b = self.a, self.b
        if self.split_input:
            b = copy_to_tensor_parallel_region(b, self.group)
        else:
            a = copy_to_tensor_parallel_region(a, self.group)
        # Scale the [.., r] product, not the [.., out] one.
        return F.linear(F.linear(x, a) * self.scale, b)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A: this rank's shard of the update of W ([out/tp, in] or [out, in/tp])."""
        return (self.b.float() @ self.a.float()) * self.scale


def _with_adapter(lora: LoRAAdapter | None) -> bool:
    return lora is not None and lora.enabled


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim: rank r computes its slice of Y.

    Args:
        in_features: full input width (the input is replicated across TP ranks).
        local_out: this rank's output width.
        group: TP process group (None: not sharded).
        gather_output: all-gather the output to the full width (sizes: per-rank widths).
        lora: a column-parallel LoRAAdapter (local_in = in_features, local_out), or None.
    """

    def __init__(
        self, in_features, local_out, group, bias=True, gather_output=False, sizes=None, lora=None
    ):
        super().__init__()
        self.group, self.gather_output, self.sizes = group, gather_output, sizes
        self.weight = nn.Parameter(torch.empty(local_out, in_features))
        self.bias = nn.Parameter(torch.empty(local_out)) if bias else None
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if _with_adapter(self.lora):
            y = y + self.lora(x)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group, self.sizes)
        return y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim; partial outputs are summed over TP.

    The input is already split (the output of a column-parallel layer); the bias is replicated and
    added once, after the all-reduce. A row-parallel `lora` adapter's partial product joins the
    partial output before that one all-reduce.
    """

    def __init__(self, local_in, out_features, group, bias=True, lora=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, local_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if _with_adapter(self.lora):
            y = y + self.lora(x)
        y = reduce_from_tensor_parallel_region(y, self.group)
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
