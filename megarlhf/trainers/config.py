"""Configuration of the training stages: optimizer, DeepSpeed/ZeRO, SFT loop, checkpoints, logging.

Each dataclass is one concern; `SFTRunConfig` composes them with the model, parallel and data
configs into the single object `tools/train_sft.py` loads from YAML plus dotted overrides. Every
field's validation lives in its class and names the key; checks that need two sections (the
sequence length against the model, ZeRO-3 against the pipeline size) live in `SFTRunConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megarlhf.config import ConfigError, ModelConfig, ParallelConfig
from megarlhf.data.config import DataConfig

OPTIMIZER_IMPLS = ("auto", "torch")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay, and global gradient-norm clipping."""

    # Optimizer implementation: "auto" (DeepSpeed FusedAdam on CUDA when it imports, else
    # torch.optim.AdamW) or "torch" (always torch.optim.AdamW).
    impl: str = "auto"
    # Peak learning rate, reached at the end of warmup.
    lr: float = 3e-4
    # Learning rate at the end of the cosine decay (absolute, not a fraction of lr).
    min_lr: float = 0.0
    # Optimizer steps of linear warmup from 0 to lr.
    warmup_steps: int = 0
    # Optimizer steps of cosine decay after warmup; 0 means until the last step of training.
    decay_steps: int = 0
    # Decoupled weight decay, applied to matrices only (not to biases, norms or embeddings' pads).
    weight_decay: float = 0.0
    # Adam beta1.
    beta1: float = 0.9
    # Adam beta2.
    beta2: float = 0.95
    # Adam epsilon.
    eps: float = 1e-8
    # Clip the global gradient norm (over every TP x PP x DP shard) to this value; 0 disables.
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        _check(self.impl in OPTIMIZER_IMPLS, "optim.impl", f"{self.impl!r} not auto|torch")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(
            0 <= self.min_lr <= self.lr,
            "optim.min_lr",
            f"must be in [0, optim.lr], got {self.min_lr}",
        )
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.decay_steps >= 0, "optim.decay_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        for k in ("beta1", "beta2"):
            _check(
                0 <= getattr(self, k) < 1,
                f"optim.{k}",
                f"must be in [0, 1), got {getattr(self, k)}",
            )
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed drives data parallelism. Precision follows model.dtype (bf16: DeepSpeed's
    bf16 mode with fp32 master weights in the optimizer; fp32: everything fp32)."""

    # ZeRO stage: 0 (plain data parallelism), 1 (optimizer states sharded over DP), 2 (and
    # gradients), 3 (and parameters; only with parallel.pp=1).
    zero_stage: int = 1
    # Overlap gradient reduction with the backward pass (ZeRO 1/2; mostly useful on GPUs).
    overlap_comm: bool = False
    # Keep reduced gradients in one contiguous buffer (ZeRO 2/3).
    contiguous_gradients: bool = True
    # Elements per gradient-reduction bucket.
    reduce_bucket_size: int = 50_000_000
    # Elements per parameter all-gather bucket (ZeRO 1/2).
    allgather_bucket_size: int = 50_000_000

    def __post_init__(self) -> None:
        _check(
            self.zero_stage in (0, 1, 2, 3),
            "deepspeed.zero_stage",
            f"{self.zero_stage} is not one of 0, 1, 2, 3",
        )
        for k in ("reduce_bucket_size", "allgather_bucket_size"):
            _check(getattr(self, k) > 0, f"deepspeed.{k}", "must be > 0")


@dataclass
class SFTConfig:
    """The supervised fine-tuning loop: batch shape, length, seed, evaluation."""

    # Rows per micro-batch on each data-parallel rank.
    micro_batch_size: int = 4
    # Micro-batches per optimizer step on each data-parallel rank (gradient accumulation). The
    # global batch is micro_batch_size * grad_accum * dp rows. Ignored when global_batch_size > 0.
    grad_accum: int = 1
    # Rows per optimizer step over all data-parallel ranks; when > 0 it sets grad_accum =
    # global_batch_size / (micro_batch_size * dp), so one config trains the same at any DP size.
    global_batch_size: int = 0
    # Optimizer steps to train; 0 means sft.epochs full epochs.
    max_steps: int = 0
    # Epochs to train when sft.max_steps is 0.
    epochs: int = 1
    # Seed of model initialization, dropout and every per-rank random stream.
    seed: int = 1234
    # JSONL files (same format as data.train_files) for a held-out loss; empty: no evaluation.
    eval_files: list[str] = field(default_factory=list)
    # Evaluate every N optimizer steps (and after the last); 0: only after the last step.
    eval_every: int = 0
    # Pipeline schedule when parallel.pp > 1 (see megarlhf.parallel.pipeline).
    pipeline_schedule: str = "1f1b"
    # Seconds any collective may wait before failing (a dead peer becomes an error, not a hang).
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for k in ("micro_batch_size", "grad_accum", "epochs"):
            _check(getattr(self, k) >= 1, f"sft.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.global_batch_size >= 0, "sft.global_batch_size", "must be >= 0 (0: off)")
        _check(self.max_steps >= 0, "sft.max_steps", "must be >= 0 (0: use sft.epochs)")
        _check(self.seed >= 0, "sft.seed", "must be >= 0")
        _check(self.eval_every >= 0, "sft.eval_every", "must be >= 0")
        _check(self.dist_timeout_s > 0, "sft.dist_timeout_s", "must be > 0")


@dataclass
class CheckpointConfig:
    """Where training state goes and where a run starts from."""

    # Save every N optimizer steps; 0: only at the end (when checkpoint.save_final).
    save_every: int = 0
    # Keep the newest N checkpoints, deleting older ones; 0 keeps all.
    keep_last: int = 2
    # Save after the last step.
    save_final: bool = True
    # "auto": resume from <output_dir>/checkpoints when it holds a complete checkpoint, else start
    # fresh; "latest": resume, failing when there is none (tools' --resume); "never": start fresh,
    # refusing a checkpoints dir that already holds checkpoints; or the path of a step dir.
    resume: str = "auto"
    # Start from the weights of this megarlhf checkpoint dir (any TP/PP layout: re-sharded on
    # load) instead of a random init; ignored when resuming. Empty: random init.
    init_from: str = ""

    def __post_init__(self) -> None:
        _check(self.save_every >= 0, "checkpoint.save_every", "must be >= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
        _check(bool(self.resume), "checkpoint.resume", "must be auto, latest, never or a path")


@dataclass
class LoggingConfig:
    """Observability: metrics.jsonl is always written; these add views on top."""

    # Write TensorBoard event files under <output_dir>/tensorboard.
    tensorboard: bool = True
    # Show a tqdm progress bar with ETA on rank 0 (only when stderr is a terminal, or forced).
    progress_bar: bool = True
    # Print a one-line summary every N steps on rank 0; 0: never.
    log_every: int = 10

    def __post_init__(self) -> None:
        _check(self.log_every >= 0, "logging.log_every", "must be >= 0")


@dataclass
class SFTRunConfig:
    """Everything `tools/train_sft.py` needs: one YAML file plus dotted overrides."""

    # Shape and family of the model.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Tensor- and pipeline-parallel sizes; data parallelism takes the remaining ranks.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Training data, tokenizer and packing.
    data: DataConfig = field(default_factory=DataConfig)
    # Optimizer and learning-rate schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # ZeRO stage and DeepSpeed communication settings.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # The SFT loop itself.
    sft: SFTConfig = field(default_factory=SFTConfig)
    # Checkpointing and resume.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Metrics, TensorBoard, progress bar.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        check_run_config(self)

    # The loop section under its stage-independent name (the engine and shared loop read it).
    @property
    def loop(self) -> SFTConfig:
        return self.sft


def check_run_config(cfg) -> None:
    """Checks across sections that every stage's run config (SFT, RM, ...) shares."""
    _check(
        cfg.data.seq_len <= cfg.model.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    check_supported(cfg.deepspeed.zero_stage, cfg.parallel.pp)


def resolve_batch(cfg, dp_size: int, section: str = "sft", unit: str = ""):
    """The config with `<section>.grad_accum` derived from `<section>.global_batch_size`.

    Args:
        cfg: a run config whose loop section (`sft`, `rm`, ...) has micro_batch_size,
            grad_accum and global_batch_size (0: keep grad_accum as given).
        dp_size: data-parallel size of this run.
        unit: how the batch is counted, for the message (e.g. " prompts").
    """
    s = getattr(cfg, section)
    if s.global_batch_size == 0:
        return cfg
    per_step = s.micro_batch_size * dp_size
    _check(
        s.global_batch_size % per_step == 0,
        f"{section}.global_batch_size",
        f"{s.global_batch_size}{unit} is not a multiple of {section}.micro_batch_size * dp = "
        f"{s.micro_batch_size} * {dp_size}",
    )
    loop = dataclasses.replace(s, grad_accum=s.global_batch_size // per_step)
    return dataclasses.replace(cfg, **{section: loop})


def check_supported(zero_stage: int, pp: int) -> None:
    """Refuse layouts DeepSpeed cannot drive, before any process group exists.

    ZeRO-3 partitions every parameter over the data-parallel group and gathers it in module
    forward hooks; a pipeline stage's backward runs from p2p gradients outside any module call,
    so DeepSpeed itself supports ZeRO-3 only without pipeline parallelism.
    """
    if zero_stage == 3 and pp > 1:
        raise ConfigError(
            f"deepspeed.zero_stage: 3 is not supported with parallel.pp={pp} (DeepSpeed gathers "
            "ZeRO-3 parameters per module call, which a pipelined backward bypasses); use "
            "deepspeed.zero_stage=1 or 2 with pipeline parallelism, or parallel.pp=1"
        )
