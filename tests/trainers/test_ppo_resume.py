"""Exact resume of a PPO run: 4 steps straight equal 2 steps, a stop, and 2 resumed steps.

The resumed run restores actor and critic (weights, AdamW moments, LR schedule), the prompt and
PTX data positions, the KL controller (adaptive, so its state matters), the actor's EMA and every
RNG from the step-2 checkpoint; steps 3 and 4 then produce the same metrics (times excepted) and
bitwise the same final actor, critic and EMA weights. Layout DP=2 (2 ranks, ZeRO-1), so per-rank
optimizer partitions and data slices are exercised.
"""

from __future__ import annotations

import pytest
import torch

from megarlhf.checkpoint.model_shards import ModelShardsReader
from tests.dist import run_ranks
from tests.trainers.common import assert_bitwise_equal, final_weights, metrics
from tests.trainers.ppo_common import run_ppo

RUN = [
    "ppo.max_steps=4",
    "checkpoint.save_every=2",
    "checkpoint.keep_last=0",
    "ppo.kl_target=0.5",
    "ppo.kl_horizon=100",
    "ppo.ptx_coef=1.0",
    "ppo.ema_decay=0.9",
    "logging.tensorboard=false",
]


def _worker(rank, world, out_dir, stop_after):
    return run_ppo(rank, RUN, out_dir, stop_after=stop_after)["metrics"]


def _sub(out, sub):
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1] / sub
    with ModelShardsReader(ckpt) as r:
        return {n: r.full_tensor(n) for n in r.names()}


@pytest.mark.timeout(400)
def test_exact_resume(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ranks(_worker, 2, str(straight), 0, timeout=200)
    first = run_ranks(_worker, 2, str(split), 2, timeout=200)[0]
    assert len(first) == 2
    resumed = run_ranks(_worker, 2, str(split), 0, timeout=200)[0]
    assert len(resumed) == 2  # steps 3 and 4 only
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            if not (k.startswith("time_") or k in ("tokens_per_s", "step_time_s")):
                assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    assert a[3]["kl_coef"] != a[0]["kl_coef"]  # the adaptive controller moved
    assert_bitwise_equal(final_weights(straight), final_weights(split))
    assert_bitwise_equal(_sub(straight, "critic"), _sub(split, "critic"))
    ema = _sub(split, "ema")
    assert_bitwise_equal(_sub(straight, "ema"), ema)
    actor = final_weights(split)
    assert any(not torch.equal(ema[n], actor[n]) for n in actor)  # an average, not a copy
