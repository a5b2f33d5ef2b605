"""Helpers for the PPO tests: build a PPOTrainer inside a spawned rank and run it."""

from __future__ import annotations

import os

from tests.trainers.common import EXT_DIR, QUIET, ROOT

PPO_TINY = str(ROOT / "configs" / "ppo_tiny.yaml")
# Small, fast PPO runs: 8 prompts, 8 new tokens, two minibatches of two micro-batches each.
SMALL = QUIET + [
    "ppo.rollout_batch_size=8",
    "ppo.micro_batch_size=2",
    "ppo.num_minibatches=2",
    "ppo.ptx_batch_size=4",
    "generation.max_new_tokens=8",
    "checkpoint.keep_last=1",
    # Keeps rounding-noise gradients from moving weights by ~lr (see test_sft_parallel).
    "optim.eps=1e-6",
    "critic_optim.eps=1e-6",
]


class Stop(Exception):
    """Raised by the stop_after hook to end a run right after a step (and its checkpoint)."""


def run_ppo(
    rank: int, overrides: list[str], out_dir: str, reward_fn=None, stop_after: int = 0
) -> dict:
    """Train one PPO run on this rank; returns {"metrics": per-step records, "last": final}.

    `stop_after` > 0 ends the run after that step (a crash after its checkpoint, in effect).
    """
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    os.chdir(ROOT)
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.loop import TrainerHooks
    from megarlhf.trainers.ppo import PPOTrainer

    cfg = load_config(PPORunConfig, PPO_TINY, SMALL + overrides)
    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
    records: list[dict] = []

    def on_step_end(step: int, rec: dict) -> None:
        records.append(rec)
        if step == stop_after:
            raise Stop

    hooks = TrainerHooks(on_step_end=on_step_end)
    trainer = PPOTrainer(cfg, ps, out_dir, hooks, reward_fn=reward_fn)
    try:
        last = trainer.train()
    except Stop:
        last = None
    return {"metrics": records, "last": last}
