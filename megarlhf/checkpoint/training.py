"""Training checkpoints: what a step directory holds, how it is written atomically, how a run
resumes from one bitwise-exactly. One assembly serves SFT, RM and PPO.

Layout of `<output_dir>/checkpoints/` (atomicity, `latest`, keep-last-N: `checkpoint/atomic.py`):

    step_000120/
      model/meta.json, model/tp00_pp00.safetensors ...   weights per (tp, pp) rank, global names
                                                         (checkpoint/model_shards.py; written by
                                                         DP rank 0; `checkpoint.init_from`,
                                                         conversion and later RLHF stages read it)
      deepspeed/state/...          DeepSpeed's engine.save_checkpoint: module, ZeRO-partitioned
                                   optimizer state (fp32 master weights, Adam moments) per rank,
                                   LR scheduler
      critic/model/, critic/deepspeed/   PPO: the critic, the same two parts (absent for
                                   critic-free estimators)
      ema/model/                   PPO with ppo.ema_decay > 0: the actor's moving average
      rng/rank_00003.pt            every random stream of each rank (python, numpy, torch, CUDA,
                                   the TP dropout trackers)
      trainer/rank_00003.pt        this rank's loop state: counters, data positions (samplers),
                                   and what the stage adds (PPO: the KL controller, the EMA shard)
      trainer_state.json           the counters for humans, plus the layout and the stage
      config.yaml                  the resolved run config
      COMPLETE.json, _ranks/       atomic.py's manifest and per-rank markers
    latest                         name of the checkpoint to resume from

Why DeepSpeed's own format for the optimizer: it is the one format that knows how ZeRO 1/2/3 lay
out their partitions, and `engine.load_checkpoint` restores them (and the module) exactly. The cost
is that the weights are stored twice (in DeepSpeed's module file and in our safetensors shards);
the shards are the portable copy. Resume reads weights from DeepSpeed's copy. Frozen models (the
PPO reference and reward model) are not saved: they are reloaded from their own paths.

Resume needs the same TP, PP and DP sizes (ZeRO partitions depend on all three); a different
TP/PP layout is refused with a pointer to the re-sharding tool, which re-shards the weights only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.model_shards import RESHARD_HINT, save_model_shard
from megarlhf.checkpoint.rng import load_rng_state, save_rng_state
from megarlhf.config import save_config
from megarlhf.optim.deepspeed_model import DS_SUBDIR, DS_TAG, DeepSpeedModel
from megarlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_DIR = "trainer"
TRAINER_JSON = "trainer_state.json"
CONFIG_FILE = "config.yaml"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run; the message says why and what to do."""


def layout_meta(ps: ParallelState, zero_stage: int) -> dict:
    return {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "zero_stage": zero_stage}


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / TRAINER_DIR / f"rank_{rank:05d}.pt"


def _deepspeed_files(tmp: Path, ps: ParallelState, mp_rank: int) -> list[Path]:
    """The DeepSpeed files this rank wrote (names carry the DP and model-parallel ranks)."""
    mine = []
    mp = f"mp_rank_{mp_rank:02d}"
    for p in sorted((tmp / DS_SUBDIR / DS_TAG).glob("*")):
        if not p.is_file() or mp not in p.name:
            continue
        if p.name.startswith("zero_pp_rank_"):
            if p.name.startswith(f"zero_pp_rank_{ps.dp_rank}_"):
                mine.append(p)
        elif ps.dp_rank == 0:
            mine.append(p)
    return mine


def write_model_shard_files(tmp: Path, weights: dict, cfg, ps: ParallelState) -> list[Path]:
    """DP rank 0 of each (tp, pp) writes its weights shard into `tmp/model/` (TP/PP rank (0, 0)
    also meta.json); returns the files this rank wrote."""
    if ps.dp_rank != 0:
        return []
    files = [
        save_model_shard(
            tmp, weights, cfg, tp=ps.tp_size, tp_rank=ps.tp_rank, pp=ps.pp_size, pp_rank=ps.pp_rank
        )
    ]
    if ps.tp_rank == 0 and ps.pp_rank == 0:
        files.append(tmp / "model" / "meta.json")
    return files


def _write_model(tmp: Path, model: DeepSpeedModel, weights: dict, ps: ParallelState) -> list[Path]:
    """DeepSpeed's state of `model` plus its portable weight shards; returns this rank's files."""
    model.save_state(tmp)
    files = _deepspeed_files(tmp, ps, model.mpu.get_model_parallel_rank())
    return files + write_model_shard_files(tmp, weights, model.module.cfg, ps)


def _write_loop_state(tmp: Path, ps: ParallelState, trackers, state, run_config) -> list[Path]:
    """This rank's RNG states and loop state (torch-saved); rank 0 also the run's config.yaml."""
    files = [save_rng_state(tmp, ps.rank, trackers)]
    path = _rank_file(tmp, ps.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    files.append(path)
    if ps.rank == 0:
        save_config(run_config, tmp / CONFIG_FILE)
        files.append(tmp / CONFIG_FILE)
    return files


def save_checkpoint(
    root: Path,
    *,
    models: dict[str, DeepSpeedModel],
    ps: ParallelState,
    counters: dict,
    loop_state: dict,
    trackers: dict,
    run_config,
    keep_last: int,
    stage: str,
    extra_weights: dict[str, dict] | None = None,
    before_commit: Callable[[int], None] | None = None,
) -> Path:
    """Write `<root>/step_{counters["step"]}` atomically. Collective over the world.

    Args:
        root: `<output_dir>/checkpoints`.
        models: {subdir: trained model}; "" is the main model (step_N/model/), others go under
            step_N/<subdir>/ (PPO's "critic").
        ps: the layout.
        counters: progress counters (their "step" names the directory), also in
            trainer_state.json.
        loop_state: this rank's further loop state (data positions, ...), torch-saveable.
        trackers: named RNG trackers of this rank.
        run_config: the resolved config, saved as YAML.
        keep_last: keep the newest N checkpoints (0: all).
        stage: "sft", "rm" or "ppo" (recorded in the manifest and trainer_state.json).
        extra_weights: {subdir: this rank's weights} of more main-model-shaped models (PPO's EMA),
            written as model shards under step_N/<subdir>/model/.
        before_commit: test hook called with the step after this rank wrote its files and before
            the commit barrier (a fault injected here leaves a torn temp directory).
    Returns:
        the committed directory.
    """
    step = int(counters["step"])
    main = models[""]
    # ZeRO-3 gathers each parameter over DP: every rank takes part, DP rank 0 writes.
    weights = {sub: m.full_state_dict() for sub, m in models.items()}
    layout = layout_meta(ps, main.zero_stage)

    def write(tmp: Path) -> list[Path]:
        files = []
        for sub, m in models.items():
            files += _write_model(tmp / sub if sub else tmp, m, weights[sub], ps)
        for sub, w in (extra_weights or {}).items():
            files += write_model_shard_files(tmp / sub, w, main.module.cfg, ps)
        state = {"counters": dict(counters), **loop_state}
        files += _write_loop_state(tmp, ps, trackers, state, run_config)
        if ps.rank == 0:
            info = {**counters, **layout, "stage": stage}
            (tmp / TRAINER_JSON).write_text(json.dumps(info, indent=1) + "\n")
            files.append(tmp / TRAINER_JSON)
        if before_commit is not None:
            before_commit(step)
        return files

    meta = {**layout, "step": step, "stage": stage}
    return atomic.save_checkpoint(
        root,
        step,
        write,
        rank=ps.rank,
        world_size=ps.world_size,
        barrier=atomic.process_group_barrier() if ps.world_size > 1 else None,
        keep_last=keep_last,
        meta=meta,
    )


def find_resume_checkpoint(root: Path, mode: str) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume` (auto | never | latest | a path).

    Raises:
        ResumeError: `latest` with nothing to resume, a path that is not a complete checkpoint,
            or `never` over a root that already holds checkpoints (they would be overwritten).
    """
    if mode == "never":
        if atomic.list_checkpoints(root):
            raise ResumeError(
                f"{root} already holds checkpoints and checkpoint.resume=never; use a new "
                "--output-dir, or checkpoint.resume=auto to continue that run"
            )
        return None
    if mode in ("auto", "latest"):
        found = atomic.find_latest(root)
        if found is None and mode == "latest":
            raise ResumeError(f"--resume: no complete checkpoint under {root}")
        return found
    path = Path(mode)
    why = atomic.incomplete_reason(path)
    if why is not None:
        raise ResumeError(f"checkpoint.resume={mode}: not a complete checkpoint: it {why}")
    return path


def check_resume_layout(ckpt: Path, ps: ParallelState, zero_stage: int) -> None:
    """Refuse a checkpoint written by another layout, before any collective load."""
    meta = atomic.read_manifest(ckpt)["meta"]
    want = layout_meta(ps, zero_stage)
    if (meta.get("tp"), meta.get("pp")) != (want["tp"], want["pp"]):
        raise ResumeError(
            f"{ckpt} was saved at tp={meta.get('tp')}, pp={meta.get('pp')} but this run uses "
            f"tp={want['tp']}, pp={want['pp']}; resuming (optimizer state included) needs the same "
            f"layout. Re-shard the weights with `python {RESHARD_HINT} {ckpt} OUT --tp "
            f"{want['tp']} --pp {want['pp']}` and start a new run with checkpoint.init_from=OUT "
            "(the optimizer state is not re-sharded)"
        )
    for key in ("dp", "zero_stage"):
        if meta.get(key) != want[key]:
            raise ResumeError(
                f"{ckpt} was saved with {key}={meta.get(key)}, this run has {key}={want[key]}; "
                "ZeRO optimizer partitions cannot be resumed across that change. Resume with "
                f"the original world size / deepspeed.zero_stage, or start from its weights with "
                f"checkpoint.init_from={ckpt}"
            )


def load_checkpoint(ckpt: Path, *, models: dict[str, DeepSpeedModel], ps: ParallelState) -> dict:
    """Restore every model's weights, optimizer and scheduler; return this rank's loop state
    ({"counters": ..., and what the stage saved}).

    RNG streams are restored separately (`restore_rng`), as the very last thing before training
    continues, so nothing done in between consumes random numbers.
    """
    check_resume_layout(ckpt, ps, models[""].zero_stage)
    path = _rank_file(ckpt, ps.rank)
    if not path.is_file():
        raise ResumeError(f"{path}: missing (checkpoint of another world size?)")
    for sub in models:
        if sub and not (ckpt / sub).is_dir():
            raise ResumeError(f"{ckpt}: has no {sub}/ (saved by a run without a {sub}?)")
    for sub, m in models.items():
        m.load_state(ckpt / sub if sub else ckpt)
    state = torch.load(path, weights_only=True)
    if dist.is_initialized():
        dist.barrier()
    return state


def restore_rng(ckpt: Path, ps: ParallelState, trackers: dict) -> None:
    load_rng_state(ckpt, ps.rank, trackers)
