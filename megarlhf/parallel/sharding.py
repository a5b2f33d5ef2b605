"""How a full tensor maps to its tensor-parallel shards: one rule for init, checkpoints, conversion
and the hybrid engine's re-sharding.

A `ShardSpec` says along which dim a parameter is split and, for fused parameters, into which
parts: a fused QKV weight `[q + k + v, h]` is three parts, each split across TP ranks on its own,
and a rank's shard is the concatenation of its slice of each part (`[q_r + k_r + v_r, h]`).
Slices may be uneven (e.g. 9 attention heads over TP=2 split by key/value groups as 6 + 3 heads),
so a part is described by the list of per-rank sizes, not by an even divisor.

Parameters without a spec are replicated on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def balanced_sizes(n: int, parts: int) -> list[int]:
    """Split n units into `parts` contiguous chunks, the first ones one larger when uneven."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class ShardSpec:
    """Split rule of one tensor-parallel parameter.

    Attributes:
        dim: the dimension that is split.
        parts: for each fused part, the per-rank sizes along `dim` (len == tp size). An unfused
            parameter has one part.
    """

    dim: int
    parts: tuple[tuple[int, ...], ...]

    @property
    def tp_size(self) -> int:
        return len(self.parts[0])

    @property
    def full_size(self) -> int:
        return sum(sum(p) for p in self.parts)

    def local_size(self, tp_rank: int) -> int:
        return sum(p[tp_rank] for p in self.parts)

    @staticmethod
    def even(dim: int, full: int, tp: int, parts: int = 1) -> ShardSpec:
        """`parts` equal fused parts of `full // parts` each, split evenly across `tp` ranks."""
        if full % parts or (full // parts) % tp:
            raise ValueError(f"size {full} in {parts} part(s) is not divisible by tp={tp}")
        per = full // parts // tp
        return ShardSpec(dim, tuple(tuple([per] * tp) for _ in range(parts)))


def shard_tensor(full: torch.Tensor, spec: ShardSpec | None, tp_rank: int) -> torch.Tensor:
    """Return rank `tp_rank`'s shard of `full` (a contiguous copy; `full` is not modified)."""
    if spec is None:
        return full.clone()
    if full.shape[spec.dim] != spec.full_size:
        raise ValueError(
            f"tensor of shape {tuple(full.shape)} has {full.shape[spec.dim]} along dim "
            f"{spec.dim}, but its shard spec expects {spec.full_size}"
        )
    pieces, offset = [], 0
    for part in spec.parts:
        start = offset + sum(part[:tp_rank])
        pieces.append(full.narrow(spec.dim, start, part[tp_rank]))
        offset += sum(part)
    return torch.cat(pieces, dim=spec.dim).contiguous()


def unshard_tensors(shards: list[torch.Tensor], spec: ShardSpec | None) -> torch.Tensor:
    """Inverse of `shard_tensor`: rebuild the full tensor from every rank's shard, in rank order.

    A replicated parameter (spec None) returns rank 0's copy.
    """
    if spec is None:
        return shards[0].clone()
    if len(shards) != spec.tp_size:
        raise ValueError(f"got {len(shards)} shards for a spec over tp={spec.tp_size}")
    per_part: list[list[torch.Tensor]] = [[] for _ in spec.parts]
    for r, shard in enumerate(shards):
        if shard.shape[spec.dim] != spec.local_size(r):
            raise ValueError(
                f"shard of rank {r} has {shard.shape[spec.dim]} along dim {spec.dim}, "
                f"expected {spec.local_size(r)}"
            )
        offset = 0
        for i, part in enumerate(spec.parts):
            per_part[i].append(shard.narrow(spec.dim, offset, part[r]))
            offset += part[r]
    return torch.cat([t for part in per_part for t in part], dim=spec.dim).contiguous()


def all_gather_full(local: torch.Tensor, spec: ShardSpec | None, group) -> torch.Tensor:
    """Rebuild the full tensor from every TP rank's shard (collective over `group`).

    Shards may be uneven; they are padded to the largest along `spec.dim` for the all-gather (which
    needs equal sizes) and trimmed before `unshard_tensors`. Replicated tensors (spec None) and
    single-rank groups return a copy of `local`.
    """
    import torch.distributed as dist

    if spec is None or group is None:
        return local.clone() if spec is None else unshard_tensors([local], spec)
    sizes = [spec.local_size(r) for r in range(spec.tp_size)]
    padded_shape = list(local.shape)
    padded_shape[spec.dim] = max(sizes)
    padded = local.new_zeros(padded_shape)
    padded.narrow(spec.dim, 0, local.shape[spec.dim]).copy_(local)
    outs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(outs, padded, group=group)
    return unshard_tensors(
        [o.narrow(spec.dim, 0, s) for o, s in zip(outs, sizes, strict=True)], spec
    )
