"""Atomic PPO checkpoints: actor and critic (weights, ZeRO optimizer, scheduler), loop state, RNGs.

One step directory holds everything, committed atomically (`megarlhf.checkpoint.atomic`):

    step_N/model/            actor weights (any-layout shards: init_from / generate.py read them)
    step_N/deepspeed/state/  actor DeepSpeed state (module, optimizer partitions, LR scheduler)
    step_N/critic/model/     critic weights (absent for critic-free rloo / grpo)
    step_N/critic/deepspeed/ critic DeepSpeed state
    step_N/ema/model/        EMA of the actor (ppo.ema_decay > 0), in the model's dtype
    step_N/trainer/rank_R.pt this rank's loop state: step, prompt / PTX data positions, KL
                             controller, the fp32 EMA shard
    step_N/rng/              every rank's RNG streams (python, numpy, torch, TP trackers)
    step_N/config.yaml       the run config

The reference and reward model are frozen and reloaded from their own paths on resume. The
sampling streams of rollouts are derived from (generation.seed, step, generation-DP rank), so the
step number restores them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megarlhf.parallel.state import ParallelState
from megarlhf.trainers.checkpointing import (
    ResumeError,
    _rank_file,
    commit_checkpoint,
    layout_meta,
    write_engine_state,
    write_loop_state,
    write_model_shard_files,
)
from megarlhf.trainers.engine import TrainEngine

CRITIC_SUBDIR = "critic"


def save_ppo_checkpoint(
    root: Path,
    *,
    step: int,
    actor: TrainEngine,
    critic: TrainEngine | None,
    ps: ParallelState,
    state: dict,
    trackers: dict,
    run_config,
    keep_last: int,
    extra_models: dict[str, dict] | None = None,
) -> Path:
    """Write `<root>/step_{step}` atomically; collective over the world.

    Args:
        state: this rank's loop state (torch-saveable), restored by `load_ppo_checkpoint`.
        trackers: named RNG trackers of this rank.
        extra_models: {subdir: this rank's weights} of more actor-shaped models (the EMA),
            written as model shards under `step_N/<subdir>/model/`.
    """
    actor_w = actor.full_state_dict()
    critic_w = critic.full_state_dict() if critic is not None else None

    def write(tmp: Path) -> list:
        files = write_engine_state(tmp, actor, actor_w, ps)
        if critic is not None:
            files += write_engine_state(tmp / CRITIC_SUBDIR, critic, critic_w, ps)
        for sub, weights in (extra_models or {}).items():
            files += write_model_shard_files(tmp / sub, weights, actor.module.cfg, ps)
        return files + write_loop_state(tmp, ps, trackers, state, run_config)

    meta = {**layout_meta(ps, actor.zero_stage), "step": step, "stage": "ppo"}
    return commit_checkpoint(root, step, write, ps, keep_last, meta)


def load_ppo_checkpoint(
    ckpt: Path, *, actor: TrainEngine, critic: TrainEngine | None, ps: ParallelState
) -> dict:
    """Restore both engines; return this rank's loop state (RNGs are restored separately)."""
    path = _rank_file(ckpt, ps.rank)
    if not path.is_file():
        raise ResumeError(f"{path}: missing (checkpoint of another world size?)")
    if critic is not None and not (ckpt / CRITIC_SUBDIR).is_dir():
        raise ResumeError(f"{ckpt}: has no {CRITIC_SUBDIR}/ (saved by a critic-free run?)")
    actor.load_state(ckpt)
    if critic is not None:
        critic.load_state(ckpt / CRITIC_SUBDIR)
    state = torch.load(path, weights_only=True)
    if dist.is_initialized():
        dist.barrier()
    return state
