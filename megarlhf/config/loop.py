"""The training loop's configuration, shared by SFT, RM and PPO: steps, seed, schedule, timeout
(`LoopConfig`, inline in `sft:`, `rm:` and `ppo:`), passes over a fixed dataset (`PassesConfig`,
SFT and RM), the `checkpoint:` and `logging:` sections, and `RunSections`, the sections every run
config has."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from megarlhf.config.loader import check
from megarlhf.config.model import ModelConfig, ParallelConfig
from megarlhf.config.optim import DeepSpeedConfig, OptimConfig


@dataclass
class LoopConfig:
    """What one training loop needs of every stage: how many steps, how big a forward, the seed,
    the pipeline schedule and how long a collective may wait."""

    # Units per forward / backward on each data-parallel rank: packed rows (SFT), whole prompts
    # with all their K completions (RM), sequences (PPO).
    micro_batch_size: int = 4
    # Optimizer steps (SFT, RM; 0: the section's epochs) or PPO steps (rollout + update) to run.
    max_steps: int = 0
    # Seed of model initialization, dropout and every per-rank random stream.
    seed: int = 1234
    # Pipeline schedule when parallel.pp > 1 (see megarlhf.parallel.pipeline).
    pipeline_schedule: str = "1f1b"
    # Seconds any collective may wait before failing (a dead peer becomes an error, not a hang).
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        mbs = self.micro_batch_size
        check(mbs >= 1, "micro_batch_size", f"must be >= 1, got {mbs}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")


@dataclass
class PassesConfig:
    """Passes over a fixed dataset (SFT rows, RM prompts): accumulation, the global batch, epochs,
    and held-out evaluation."""

    # Micro-batches per optimizer step on each data-parallel rank (gradient accumulation). The
    # global batch is micro_batch_size * grad_accum * dp. Ignored when global_batch_size > 0.
    grad_accum: int = 1
    # Units per optimizer step over all data-parallel ranks; when > 0 it sets grad_accum =
    # global_batch_size / (micro_batch_size * dp), so one config trains the same at any DP size.
    global_batch_size: int = 0
    # Epochs to train when max_steps is 0.
    epochs: int = 1
    # Held-out files (the training files' format) for eval_* metrics; empty: no evaluation.
    eval_files: list[str] = field(default_factory=list)
    # Evaluate every N optimizer steps (and after the last); 0: only after the last step.
    eval_every: int = 0

    def __post_init__(self) -> None:
        for k in ("grad_accum", "epochs"):
            check(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        check(self.global_batch_size >= 0, "global_batch_size", "must be >= 0 (0: off)")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")


def resolve_batch(loop: LoopConfig, passes: PassesConfig, dp_size: int, section: str, unit: str):
    """`passes` with grad_accum derived from global_batch_size for this DP size.

    Args:
        loop, passes: the stage's loop and passes sections.
        dp_size: data-parallel size of this run.
        section: the YAML section ("sft", "rm"), for the message.
        unit: how the batch is counted, for the message (e.g. " prompts").
    """
    if passes.global_batch_size == 0:
        return passes
    per_step = loop.micro_batch_size * dp_size
    check(
        passes.global_batch_size % per_step == 0,
        f"{section}.global_batch_size",
        f"{passes.global_batch_size}{unit} is not a multiple of {section}.micro_batch_size * dp "
        f"= {loop.micro_batch_size} * {dp_size}",
    )
    return dataclasses.replace(passes, grad_accum=passes.global_batch_size // per_step)


@dataclass
class CheckpointConfig:
    """Where training state goes and where a run starts from."""

    # Save every N optimizer steps; 0: only at the end (when checkpoint.save_final).
    save_every: int = 0
    # Keep the newest N checkpoints, deleting older ones; 0 keeps all.
    keep_last: int = 2
    # Save after the last step.
    save_final: bool = True
    # Save only what a trained model is used for (its weight shards, the run's config and
    # counters), not DeepSpeed's optimizer and scheduler state, as HF Trainer's save_only_model:
    # the checkpoints serve init_from, tools/generate.py, evaluation and export, and resuming
    # from one is refused. Saves Adam's fp32 moments and master copy (12 bytes a parameter:
    # 1.6 GB of each 2.1 GB checkpoint of a 135M bf16 model) and their write time.
    save_only_model: bool = False
    # "auto": resume from <output_dir>/checkpoints when it holds a complete checkpoint, else start
    # fresh; "latest": resume, failing when there is none (tools' --resume); "never": start fresh,
    # refusing a checkpoints dir that already holds checkpoints; or the path of a step dir.
    resume: str = "auto"
    # Start from the weights of this megarlhf checkpoint dir (any TP/PP layout: re-sharded on
    # load) instead of a random init; ignored when resuming. Empty: random init.
    init_from: str = ""

    def __post_init__(self) -> None:
        check(self.save_every >= 0, "save_every", "must be >= 0")
        check(self.keep_last >= 0, "keep_last", "must be >= 0 (0 keeps all)")
        check(bool(self.resume), "resume", "must be auto, latest, never or a path")


@dataclass
class LoggingConfig:
    """Observability: metrics.jsonl is always written; these add views on top (the trackers:
    megarlhf.utils.trackers)."""

    # Write TensorBoard event files under <output_dir>/tensorboard.
    tensorboard: bool = True
    # Show a tqdm progress bar with ETA on rank 0 (only when stderr is a terminal, or forced).
    progress_bar: bool = True
    # Print a one-line summary every N steps on rank 0; 0: never.
    log_every: int = 10
    # Also log to Weights & Biases (pip install megarlhf[wandb]; WANDB_MODE=offline needs no
    # account). A resumed run continues the same W&B run (its id is kept in trackers.json).
    wandb: bool = False
    # W&B project.
    wandb_project: str = "megarlhf"
    # W&B entity (user or team); empty: the account's default.
    wandb_entity: str = ""
    # W&B run display name; empty: the output directory's name.
    wandb_run_name: str = ""
    # W&B run id to create or continue; empty: a new id, kept in <output_dir>/trackers.json.
    wandb_run_id: str = ""
    # Also log to MLflow (pip install megarlhf[mlflow]); a resumed run continues the same run.
    mlflow: bool = False
    # MLflow tracking URI; empty: the SQLite file sqlite:///<output_dir>/mlflow.db.
    mlflow_tracking_uri: str = ""
    # MLflow experiment (created when missing).
    mlflow_experiment: str = "megarlhf"
    # MLflow run name; empty: the output directory's name.
    mlflow_run_name: str = ""

    def __post_init__(self) -> None:
        check(self.log_every >= 0, "log_every", "must be >= 0")
        for tracker, package in (("wandb", "wandb"), ("mlflow", "mlflow")):
            check(
                not getattr(self, tracker) or importlib.util.find_spec(package) is not None,
                tracker,
                f"true needs the {package} package (pip install megarlhf[{tracker}])",
            )
        bad = sorted(set(self.wandb_run_id) & set("/\\#?%:"))
        check(not bad, "wandb_run_id", f"{self.wandb_run_id!r}: W&B run ids cannot contain {bad}")
        check(bool(self.wandb_project), "wandb_project", "must not be empty")
        check(bool(self.mlflow_experiment), "mlflow_experiment", "must not be empty")


@dataclass
class RunSections:
    """The sections every run config has (a stage's run config adds its data and its loop)."""

    # Shape and family of the model (the actor's, for PPO).
    model: ModelConfig = field(default_factory=ModelConfig)
    # Tensor- and pipeline-parallel sizes; data parallelism takes the remaining ranks.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Optimizer and learning-rate schedule (the actor's, for PPO).
    optim: OptimConfig = field(default_factory=OptimConfig)
    # ZeRO stage and DeepSpeed communication settings (every trained model of the run).
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Checkpointing, resume, and checkpoint.init_from.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Metrics, TensorBoard, progress bar.
    logging: LoggingConfig = field(default_factory=LoggingConfig)
