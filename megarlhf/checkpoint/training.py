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

LoRA (model.lora.rank > 0): `model/` holds only what trains (the adapters, and a scalar head)
and names the base the frozen weights came from (checkpoint/lora_shards.py); DeepSpeed's module
file leaves the frozen parameters out, and its optimizer never had them. Resuming reloads the base
from that record first (`init_from.restore_base`), then DeepSpeed's state, so the run continues
bitwise without a copy of the base in any checkpoint. Readers of `model/` see the merged model.

Integrity: every file's checksum is in COMPLETE.json (`atomic.py`); `load_checkpoint` checks the
files this rank is about to read (its DeepSpeed files, loop state and RNG state) before DeepSpeed
or torch unpickles them, so a corrupt file is named instead of failing deep inside a loader. A
first save checks the free space against the state about to be written (`expected_bytes`), later
ones against the previous checkpoint's size.

Resume needs the same TP, PP and DP sizes (ZeRO partitions depend on all three); a different
TP/PP layout is refused with a pointer to the re-sharding tool, which re-shards the weights only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.init_from import restore_base
from megarlhf.checkpoint.lora_shards import LoRABase
from megarlhf.checkpoint.model_shards import RESHARD_HINT, read_meta, save_model_shard
from megarlhf.checkpoint.rng import load_rng_state, rng_file, save_rng_state
from megarlhf.config import save_config
from megarlhf.optim.deepspeed_model import DS_SUBDIR, DS_TAG, DeepSpeedModel
from megarlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_DIR = "trainer"
TRAINER_JSON = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# DeepSpeed's per-rank file names: `[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_*` (ZeRO partitions,
# read by their own DP rank) and `mp_rank_{mp:02d}_*` (the module, read by every DP rank).
_DS_ZERO_RE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_mp_rank_(\d+)_")
_DS_MP_RE = re.compile(r"^mp_rank_(\d+)_")


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run; the message says why and what to do."""


def layout_meta(ps: ParallelState, zero_stage: int) -> dict:
    return {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "zero_stage": zero_stage}


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / TRAINER_DIR / f"rank_{rank:05d}.pt"


def _deepspeed_owner(name: str) -> tuple[int | None, int] | None:
    """(DP rank or None for every DP rank, model-parallel rank) of a DeepSpeed file name, or None
    for files of no rank (e.g. its helper scripts)."""
    m = _DS_ZERO_RE.search(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _DS_MP_RE.match(name)
    return (None, int(m.group(1))) if m else None


def _deepspeed_files(tmp: Path, ps: ParallelState, mp_rank: int) -> list[Path]:
    """The DeepSpeed files this rank wrote (names carry the DP and model-parallel ranks; the
    files every DP rank shares are DP rank 0's)."""
    mine = []
    for p in sorted((tmp / DS_SUBDIR / DS_TAG).glob("*")):
        owner = _deepspeed_owner(p.name) if p.is_file() else None
        if owner is not None and owner[1] == mp_rank and (owner[0] or 0) == ps.dp_rank:
            mine.append(p)
    return mine


def _deepspeed_reads(files: Iterable[str], prefix: str, dp_rank: int, mp_rank: int, every_dp: bool):
    """Of a checkpoint's files (relative paths), those DeepSpeed's load reads on this rank: the
    module file of its model-parallel rank and its own ZeRO partition (every DP rank's with
    elastic checkpoints)."""
    folder = f"{prefix}{DS_SUBDIR}/{DS_TAG}/"
    out = []
    for rel in files:
        name = rel.removeprefix(folder)
        if name == rel or "/" in name:
            continue
        owner = _deepspeed_owner(name)
        if owner is None or owner[1] != mp_rank:
            continue
        if owner[0] is None or owner[0] == dp_rank or every_dp:
            out.append(rel)
    return out


def write_model_shard_files(
    tmp: Path, weights: dict, cfg, ps: ParallelState, lora_base: LoRABase | None = None
) -> list[Path]:
    """DP rank 0 of each (tp, pp) writes its weights shard into `tmp/model/` (TP/PP rank (0, 0)
    also meta.json); returns the files this rank wrote. A LoRA model writes what it trains and
    records `lora_base`."""
    if ps.dp_rank != 0:
        return []
    # No checksum sidecar: the atomic manifest records every file's checksum.
    files = [
        save_model_shard(
            tmp,
            weights,
            cfg,
            tp=ps.tp_size,
            tp_rank=ps.tp_rank,
            pp=ps.pp_size,
            pp_rank=ps.pp_rank,
            record_checksums=False,
            lora_base=lora_base,
        )
    ]
    if ps.tp_rank == 0 and ps.pp_rank == 0:
        files.append(tmp / "model" / "meta.json")
    return files


def _write_model(
    tmp: Path, model: DeepSpeedModel, weights: dict, ps: ParallelState, model_only: bool
) -> list[Path]:
    """DeepSpeed's state of `model` (unless `model_only`) plus its portable weight shards;
    returns this rank's files."""
    files = []
    if not model_only:
        model.save_state(tmp)
        files = _deepspeed_files(tmp, ps, model.mpu.get_model_parallel_rank())
    base = _lora_base(model)
    return files + write_model_shard_files(tmp, weights, model.module.cfg, ps, base)


def _lora_base(model: DeepSpeedModel) -> LoRABase | None:
    """The base a LoRA model's checkpoint records (None: not a LoRA model)."""
    return LoRABase.of(model.module) if model.module.cfg.lora.enabled else None


def _tensor_bytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _optimizer_bytes(model: DeepSpeedModel, ps: ParallelState) -> int:
    """Bytes of optimizer state this rank's DeepSpeed files hold: the inner optimizer's state
    (Adam moments) and ZeRO's fp32 master partition. ZeRO 0 keeps it whole on every DP rank and
    DP rank 0 writes it."""
    if model.zero_stage == 0 and ps.dp_rank != 0:
        return 0
    opt = model.optimizer
    inner = getattr(opt, "optimizer", opt)
    total = sum(_tensor_bytes(st.values()) for st in getattr(inner, "state", {}).values())
    fp32_copies = (  # ZeRO 1/2, ZeRO 3, bf16 without ZeRO
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
    )
    for name in fp32_copies:
        total += _tensor_bytes(getattr(opt, name, None) or [])
    return total


def expected_bytes(
    models: dict, weights: dict, extra: dict, ps: ParallelState, model_only: bool = False
) -> int:
    """Estimated size of a whole checkpoint (every rank's files), from the tensors about to be
    written: each (tp, pp) rank's weights twice (the safetensors shard and DeepSpeed's module
    copy) plus the optimizer state; with `model_only`, the shards alone. Collective over the
    world (a sum)."""
    local = 0 if model_only else sum(_optimizer_bytes(m, ps) for m in models.values())
    if ps.dp_rank == 0:
        copies = 1 if model_only else 2
        local += copies * sum(_tensor_bytes(w.values()) for w in weights.values())
        local += sum(_tensor_bytes(w.values()) for w in extra.values())
    total = torch.tensor([local], dtype=torch.int64)
    if dist.is_initialized() and ps.world_size > 1:
        dist.all_reduce(total)
    return int(total.item())


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
    model_only: bool = False,
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
        model_only: leave out DeepSpeed's state (`checkpoint.save_only_model`; recorded in the
            manifest's meta, and resuming refuses it).
    Returns:
        the committed directory.
    Raises:
        CheckpointDirError: too little free space (on every rank, before writing), or the disk
            filled up while writing (the previous checkpoint stays what `latest` names).
    """
    step = int(counters["step"])
    main = models[""]
    # ZeRO-3 gathers each parameter over DP: every rank takes part, DP rank 0 writes.
    # LoRA: only the trained tensors (the frozen base is not saved, so not copied either).
    weights = {
        sub: m.full_state_dict(trainable_only=m.module.cfg.lora.enabled)
        for sub, m in models.items()
    }
    layout = layout_meta(ps, main.zero_stage)

    def write(tmp: Path) -> list[Path]:
        files = []
        for sub, m in models.items():
            files += _write_model(tmp / sub if sub else tmp, m, weights[sub], ps, model_only)
        for sub, w in (extra_weights or {}).items():
            files += write_model_shard_files(tmp / sub, w, main.module.cfg, ps, _lora_base(main))
        state = {"counters": dict(counters), **loop_state}
        files += _write_loop_state(tmp, ps, trackers, state, run_config)
        if ps.rank == 0:
            info = {**counters, **layout, "stage": stage}
            (tmp / TRAINER_JSON).write_text(json.dumps(info, indent=1) + "\n")
            files.append(tmp / TRAINER_JSON)
        if before_commit is not None:
            before_commit(step)
        return files

    meta = {**layout, "step": step, "stage": stage, **({"model_only": True} if model_only else {})}
    expected = expected_bytes(models, weights, extra_weights or {}, ps, model_only)
    return atomic.save_checkpoint(
        root,
        step,
        write,
        rank=ps.rank,
        world_size=ps.world_size,
        barrier=atomic.process_group_barrier() if ps.world_size > 1 else None,
        keep_last=keep_last,
        meta=meta,
        expected_bytes=expected,
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
    """Refuse a checkpoint written by another layout, or without optimizer state, before any
    collective load."""
    meta = atomic.read_manifest(ckpt)["meta"]
    if meta.get("model_only"):
        raise ResumeError(
            f"{ckpt} was saved with checkpoint.save_only_model=true: it holds the weights but no "
            "optimizer state, so it cannot be resumed. Start a new run from its weights with "
            f"checkpoint.init_from={ckpt} (and another --output-dir), or train with "
            "checkpoint.save_only_model=false to keep resumable checkpoints"
        )
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


def files_to_read(ckpt: Path, models: dict[str, DeepSpeedModel], ps: ParallelState) -> list[str]:
    """The files (relative to `ckpt`) that resuming reads on this rank: each model's DeepSpeed
    files of this rank, its loop state and its RNG state."""
    listed = atomic.read_manifest(ckpt)["files"]
    rels = []
    for sub, m in models.items():
        prefix = f"{sub}/" if sub else ""
        every_dp = bool(m.ds.zero_elastic_checkpoint()) if m.zero_stage > 0 else False
        mp_rank = m.mpu.get_model_parallel_rank()
        rels += _deepspeed_reads(listed, prefix, ps.dp_rank, mp_rank, every_dp)
    rels.append(_rank_file(Path(), ps.rank).as_posix())
    rels.append(rng_file(Path(), ps.rank).as_posix())
    return rels


def _corrupt_hint(ckpt: Path) -> str:
    """What to do about a corrupt file of `ckpt`: the newest earlier checkpoint, if any."""
    step = atomic.parse_step(ckpt.name)
    earlier = [p for s, p in atomic.list_checkpoints(ckpt.parent) if step is not None and s < step]
    if earlier:
        return f"resume from an earlier checkpoint (--resume-from {earlier[-1]}) or restore it"
    return "restore it from a good copy (this run has no earlier checkpoint)"


def load_checkpoint(ckpt: Path, *, models: dict[str, DeepSpeedModel], ps: ParallelState) -> dict:
    """Restore every model's weights, optimizer and scheduler; return this rank's loop state
    ({"counters": ..., and what the stage saved}).

    The files this rank reads are checked against their recorded checksums first (a checkpoint
    saved before checksums existed is loaded unchecked). RNG streams are restored separately
    (`restore_rng`), as the very last thing before training continues, so nothing done in between
    consumes random numbers.

    Raises:
        CorruptCheckpointError: a file this rank reads differs from its checksum (named).
        ResumeError: another layout, a missing rank file or model.
    """
    check_resume_layout(ckpt, ps, models[""].zero_stage)
    path = _rank_file(ckpt, ps.rank)
    if not path.is_file():
        raise ResumeError(f"{path}: missing (checkpoint of another world size?)")
    for sub in models:
        if sub and not (ckpt / sub).is_dir():
            raise ResumeError(f"{ckpt}: has no {sub}/ (saved by a run without a {sub}?)")
    atomic.verify_files(ckpt, files_to_read(ckpt, models, ps), _corrupt_hint(ckpt))
    for sub, m in models.items():
        _restore_lora_base(ckpt / sub if sub else ckpt, m, ps)
        m.load_state(ckpt / sub if sub else ckpt)
    state = torch.load(path, weights_only=True)
    if dist.is_initialized():
        dist.barrier()
    return state


def _restore_lora_base(model_dir: Path, model: DeepSpeedModel, ps: ParallelState) -> None:
    """A LoRA model's frozen base, as its checkpoint in `model_dir` recorded it (before
    DeepSpeed's state, which holds only what trains)."""
    if not model.module.cfg.lora.enabled:
        return
    adapters = read_meta(model_dir).adapters
    if adapters is None:
        raise ResumeError(f"{model_dir}: not a LoRA checkpoint, but this run trains adapters")
    restore_base(model.module, adapters.base, ps)


def restore_rng(ckpt: Path, ps: ParallelState, trackers: dict) -> None:
    load_rng_state(ckpt, ps.rank, trackers)
