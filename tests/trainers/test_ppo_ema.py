"""The actor EMA equals the fold ema <- d * ema + (1 - d) * w over the weights after every actor
optimizer step (recorded independently), bitwise in fp32, and is saved as an any-layout model."""

from __future__ import annotations

import os

import pytest
import torch

from megarlhf.checkpoint.model_shards import ModelShardsReader
from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, ROOT
from tests.trainers.ppo_common import PPO_TINY, SMALL

DECAY = 0.75


def _worker(rank, world, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    os.chdir(ROOT)
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.ppo import PPOTrainer

    over = SMALL + ["ppo.max_steps=2", f"ppo.ema_decay={DECAY}", "logging.tensorboard=false"]
    cfg = load_config(PPORunConfig, PPO_TINY, over)
    trainer = PPOTrainer(cfg, build_parallel_state(1, 1), out_dir)
    trainer.setup()
    module = trainer.actor.module
    snapshots = [{n: p.detach().float().clone() for n, p in module.named_parameters()}]
    step = trainer.actor.step

    def recording_step():
        out = step()
        snapshots.append({n: p.detach().float().clone() for n, p in module.named_parameters()})
        return out

    trainer.actor.step = recording_step
    trainer.train()
    return snapshots, {n: t.clone() for n, t in trainer.ema.shadow.items()}


@pytest.mark.timeout(200)
def test_ema_is_the_fold_of_every_step(tmp_path):
    snapshots, shadow = run_ranks(_worker, 1, str(tmp_path), timeout=150)[0]
    assert len(snapshots) == 1 + 2 * 2  # initial + 2 PPO steps x 2 minibatches
    want = {n: t.clone() for n, t in snapshots[0].items()}
    for snap in snapshots[1:]:
        for n in want:
            want[n].mul_(DECAY).add_(snap[n], alpha=1.0 - DECAY)
    for n in want:
        assert torch.equal(shadow[n], want[n]), n
    assert any(not torch.equal(want[n], snapshots[-1][n]) for n in want)
    with ModelShardsReader(tmp_path / "checkpoints" / "step_000002" / "ema") as r:
        saved = {n: r.full_tensor(n) for n in r.names()}
    for n, t in saved.items():
        assert torch.equal(t, want[n][: t.shape[0]]), n
