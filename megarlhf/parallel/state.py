"""Parallel state: the tensor-, pipeline- and data-parallel process groups of one layout.

A `ParallelState` is an immutable object built from an initialized `torch.distributed` world and
passed explicitly to every layer, schedule and trainer that communicates. Nothing here is a module
global, so two layouts (the PPO hybrid engine's training and generation layouts) live side by side.

Rank order (Megatron's default): tensor-parallel ranks are adjacent, then data-parallel, then
pipeline-parallel:

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a TP group is `tp` consecutive ranks (one node), and a pipeline spans the slowest dimension.

Every group is created with the run's collective timeout (`timeout_s`, the same one the world was
made with) and a description ("tensor-parallel group", ...) that torch keeps as the group's
`group_desc`, so a hung peer ends a collective after `timeout_s` and the error can name the group.
Without `timeout_s` a group gets torch's default (30 minutes for gloo).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megarlhf.config.loader import ConfigError

# The description each group is created with (torch's `group_desc`, read back by error reports).
GROUP_DESCS = {
    "tp": "tensor-parallel group",
    "dp": "data-parallel group",
    "pp": "pipeline-parallel group",
    "mp": "model-parallel group",
    "emb": "embedding group",
}


class LayoutError(ConfigError):
    """The parallel sizes do not fit the world (a user error: the message names the sizes)."""


@dataclass(frozen=True)
class ParallelState:
    """Process groups and coordinates of this rank in one (tp, pp, dp) layout.

    Groups are None when their size is 1 (or in a single process without torch.distributed), and
    every collective in megarlhf is a no-op on a None group.
    """

    # Sizes of the three dimensions; tp * pp * dp == world_size.
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    # This rank's coordinates.
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    # Global rank and world size this layout was built from.
    rank: int = 0
    world_size: int = 1
    # Groups this rank belongs to (None when that dimension has size 1).
    tp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    # TP x PP ranks that hold one full model replica (global gradient-norm clipping).
    mp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    # First and last pipeline stage of this pipeline (tied input/output embeddings).
    embedding_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    # Global ranks of this rank's pipeline, stage by stage (point-to-point peers).
    pp_ranks: tuple[int, ...] = (0,)
    # Global ranks of this rank's TP group and DP group.
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    # Collective timeout every group of this layout was made with (None: torch's default); any
    # group made later for this layout (DeepSpeed's size-1 groups) takes the same.
    timeout_s: float | None = field(default=None, compare=False)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (broadcast source)."""
        return self.tp_ranks[0]

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}, "
            f"pp {self.pp_rank}/{self.pp_size}, dp {self.dp_rank}/{self.dp_size}"
        )


def single_process_state() -> ParallelState:
    """The trivial layout: one process, no groups."""
    return ParallelState()


def global_rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank at the given coordinates (order: tp fastest, then dp, then pp)."""
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Check that tp x pp divides the world; return the data-parallel size.

    Raises:
        LayoutError: naming the sizes, before any collective is issued.
    """
    if tp < 1 or pp < 1:
        raise LayoutError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
    if world_size % (tp * pp) != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
            f"{tp} * {pp} = {tp * pp}; choose sizes whose product divides the number of ranks"
        )
    return world_size // (tp * pp)


def group_timeout(timeout_s: float | None) -> datetime.timedelta | None:
    """The `timeout` argument of `dist.new_group` for a layout's timeout (None: torch's)."""
    return None if timeout_s is None else datetime.timedelta(seconds=timeout_s)


def _make_groups(tp: int, pp: int, dp: int, rank: int, timeout, name: str) -> dict[str, object]:
    """Create every group of a (tp, pp, dp) layout (collective: all ranks, same order); return
    this rank's groups and rank tuples by kind ("tp", "tp_ranks", "dp", ..., "emb", "mp")."""

    def group(ranks: list[int], kind: str):
        # new_group must be called by every rank for every group, member or not.
        desc = f"{name} {GROUP_DESCS[kind]}" if name else GROUP_DESCS[kind]
        g = dist.new_group(ranks, timeout=timeout, group_desc=desc)
        return g if rank in ranks else None

    mine: dict[str, object] = {}
    for p in range(pp):
        for d in range(dp):
            ranks = [global_rank_of(t, d, p, tp, dp) for t in range(tp)]
            g = group(ranks, "tp")
            if rank in ranks:
                mine["tp"], mine["tp_ranks"] = g, tuple(ranks)
    for p in range(pp):
        for t in range(tp):
            ranks = [global_rank_of(t, d, p, tp, dp) for d in range(dp)]
            g = group(ranks, "dp")
            if rank in ranks:
                mine["dp"], mine["dp_ranks"] = g, tuple(ranks)
    for d in range(dp):
        for t in range(tp):
            ranks = [global_rank_of(t, d, p, tp, dp) for p in range(pp)]
            g = group(ranks, "pp")
            emb = sorted({ranks[0], ranks[-1]})
            ge = group(emb, "emb")
            if rank in ranks:
                mine["pp"], mine["pp_ranks"], mine["emb"] = g, tuple(ranks), ge
    for d in range(dp):
        ranks = [global_rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)]
        g = group(ranks, "mp")
        if rank in ranks:
            mine["mp"] = g
    return mine


def build_parallel_state(
    tp: int = 1, pp: int = 1, timeout_s: float | None = None, name: str = ""
) -> ParallelState:
    """Build one layout's groups from the initialized default world.

    Every rank must call this with the same arguments, in the same order relative to other
    `build_parallel_state` calls, because `dist.new_group` is collective over the whole world.
    Calling it twice builds two independent layouts over the same ranks.

    Args:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        timeout_s: timeout of every collective on this layout's groups (the run's
            `dist_timeout_s`); None leaves torch's default (1,800 s).
        name: prefix of the groups' descriptions (e.g. "generation" for "generation
            tensor-parallel group"), to tell two layouts apart in an error.

    Returns:
        This rank's ParallelState. Without an initialized world, tp = pp = 1 gives the
        single-process state and anything else is an error.
    """
    if not (dist.is_available() and dist.is_initialized()):
        validate_layout(1, tp, pp)
        return ParallelState(timeout_s=timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = validate_layout(world, tp, pp)
    mine = _make_groups(tp, pp, dp, rank, group_timeout(timeout_s), name)
    pp_rank, rem = divmod(rank, dp * tp)
    dp_rank, tp_rank = divmod(rem, tp)
    return ParallelState(
        tp_size=tp,
        pp_size=pp,
        dp_size=dp,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        rank=rank,
        world_size=world,
        tp_group=mine["tp"] if tp > 1 else None,
        pp_group=mine["pp"] if pp > 1 else None,
        dp_group=mine["dp"] if dp > 1 else None,
        mp_group=mine["mp"] if tp * pp > 1 else None,
        embedding_group=mine["emb"] if pp > 1 else None,
        pp_ranks=mine["pp_ranks"],
        tp_ranks=mine["tp_ranks"],
        dp_ranks=mine["dp_ranks"],
        timeout_s=timeout_s,
    )


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialize the default process group from launcher environment variables.

    Works under the `deepspeed` launcher, torchrun, and as one plain process (no RANK in the
    environment: nothing is initialized). Uses nccl (and gloo for CPU tensors) when CUDA is
    available, else gloo. The timeout bounds every collective, so a dead peer turns into an error
    instead of a hang.

    Returns:
        (rank, world_size).
    """
    if "RANK" not in os.environ:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    # With CUDA: NCCL for device tensors, gloo for the small CPU tensors of the metric and
    # bookkeeping collectives (megarlhf.parallel.scalars), both in one process group.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Barrier and destroy the default group; without it a rank can abort at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
