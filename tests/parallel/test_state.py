"""ParallelState: group membership and rank order, refusal of bad sizes (a user error), two layouts
at once, and every group (DeepSpeed's size-1 groups too) made with the layout's timeout and a
description naming it."""

import time

import pytest
import torch
import torch.distributed as dist

from megarlhf.config import ConfigError
from megarlhf.parallel.state import (
    LayoutError,
    build_parallel_state,
    global_rank_of,
    validate_layout,
)
from tests.dist import run_ranks


def test_refuses_indivisible_world_before_any_collective():
    with pytest.raises(LayoutError, match="world size 4 is not divisible by.*3 \\* 1 = 3") as e:
        validate_layout(4, 3, 1)
    assert isinstance(e.value, ConfigError)  # the tools report it as a user error (exit 2)
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


def _group_settings(rank, world):
    from megarlhf.optim.deepspeed_model import DeepSpeedMPU

    train = build_parallel_state(tp=2, pp=2, timeout_s=7.0)
    gen = build_parallel_state(tp=2, pp=1, timeout_s=7.0, name="generation")
    DeepSpeedMPU(train)  # dp = 1: a size-1 data-parallel group of its own
    seen = {}
    for pg in dist.distributed_c10d._world.pg_map:
        if pg is not dist.group.WORLD:
            timeout = pg._get_backend(torch.device("cpu")).options._timeout
            seen.setdefault(pg.group_desc, set()).add(timeout.total_seconds())
    return seen, train.timeout_s, gen.timeout_s


def test_every_group_takes_the_layout_timeout():
    """Without it a subgroup gets torch's default (1,800 s): a hung rank stalls for 30 minutes."""
    for rank, (seen, train_t, gen_t) in enumerate(run_ranks(_group_settings, 4, timeout=120)):
        assert train_t == gen_t == 7.0
        assert set().union(*seen.values()) == {7.0}, seen
        kinds = ["tensor-parallel", "pipeline-parallel", "embedding", "model-parallel",
                 "generation tensor-parallel", "generation data-parallel"]  # fmt: skip
        for desc in [f"{k} group" for k in kinds] + [f"singleton group of rank {rank}"]:
            assert desc in seen, (desc, sorted(seen))


def _wait_on_a_hung_peer(rank, world):
    ps = build_parallel_state(tp=1, pp=1, timeout_s=2.0)  # dp = 2
    if rank == 1:
        time.sleep(6)  # never joins the all-reduce: a hung peer
        return None
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="Timed out"):
        dist.all_reduce(torch.ones(4), group=ps.dp_group)
    return time.monotonic() - t0


def test_a_collective_on_a_subgroup_times_out_after_the_layout_timeout():
    waited, _ = run_ranks(_wait_on_a_hung_peer, 2, timeout=120)
    assert 1.5 < waited < 10, waited
