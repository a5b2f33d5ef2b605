"""ParallelState: group membership and rank order, refusal of bad sizes, two layouts at once."""

import pytest
import torch
import torch.distributed as dist

from megarlhf.parallel.state import build_parallel_state, global_rank_of, validate_layout
from tests.dist import run_ranks


def test_refuses_indivisible_world_before_any_collective():
    with pytest.raises(ValueError, match="world size 4 is not divisible by.*3 \\* 1 = 3"):
        validate_layout(4, 3, 1)
    with pytest.raises(ValueError, match="world size 1"):
        build_parallel_state(tp=2)  # no process group: world of one


def _members(group):
    """Global ranks in `group`, found by an all-gather inside it (not from our own bookkeeping)."""
    if group is None:
        return [dist.get_rank()]
    out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor([dist.get_rank()]), group=group)
    return [int(t) for t in out]


def _layouts(rank, world):
    train = build_parallel_state(tp=2, pp=2)
    gen = build_parallel_state(tp=4, pp=1)  # a second layout over the same world
    with pytest.raises(ValueError, match="not divisible"):
        build_parallel_state(tp=3, pp=1)
    return {
        "train": (train.tp_rank, train.dp_rank, train.pp_rank),
        "train_tp": _members(train.tp_group),
        "train_pp": _members(train.pp_group),
        "train_emb": _members(train.embedding_group),
        "train_mp": _members(train.mp_group),
        "pp_ranks": list(train.pp_ranks),
        "gen": (gen.tp_rank, gen.dp_rank, gen.pp_rank, gen.dp_size),
        "gen_tp": _members(gen.tp_group),
    }


def test_two_layouts_over_four_ranks():
    results = run_ranks(_layouts, 4, timeout=120)
    for rank, r in enumerate(results):
        tp_rank, dp_rank, pp_rank = r["train"]
        assert global_rank_of(tp_rank, dp_rank, pp_rank, 2, 1) == rank
        assert (tp_rank, pp_rank) == (rank % 2, rank // 2)  # tp adjacent, pp slowest
        assert r["train_tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["train_pp"] == [rank % 2, rank % 2 + 2] == r["pp_ranks"]
        assert r["train_emb"] == r["train_pp"]  # first and last stage of a 2-stage pipeline
        assert r["train_mp"] == [0, 1, 2, 3]
        assert r["gen"] == (rank, 0, 0, 1)
        assert r["gen_tp"] == [0, 1, 2, 3]


def _dp_layout(rank, world):
    ps = build_parallel_state(tp=1, pp=2)  # dp = 2
    return ps.dp_rank, ps.pp_rank, _members(ps.dp_group), _members(ps.pp_group)


def test_data_parallel_groups():
    results = run_ranks(_dp_layout, 4, timeout=120)
    assert results[0] == (0, 0, [0, 1], [0, 2])
    assert results[1] == (1, 0, [0, 1], [1, 3])
    assert results[3] == (1, 1, [2, 3], [1, 3])
