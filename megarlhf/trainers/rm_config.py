"""Configuration of the reward-model stage: ranking data, the RM loop, and the run that composes
them with the shared model / parallel / optimizer / DeepSpeed / checkpoint / logging sections.

Batches are counted in prompts: a micro-batch holds `rm.micro_batch_size` whole prompts, i.e. all
K completions of each (the number of sequences forwarded varies with K). `max_k` lives under
`data` because the ranking loader validates it (its error message names `data.max_k`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config import ConfigError, ModelConfig, ParallelConfig
from megarlhf.data.tokenizer import TEMPLATES
from megarlhf.trainers.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    OptimConfig,
    check_run_config,
)

# Most completions per prompt the InstructGPT labeling interface showed.
MAX_K = 9


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class RMDataConfig:
    """Ranking data: files, tokenizer, formatting, length, K limit, bad-input policy, seed."""

    # JSONL files of {"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"} rows.
    train_files: list[str] = field(default_factory=lambda: ["data/rm_tiny.jsonl"])
    # Tokenizer: a sentencepiece .model file, a folder with tokenizer.model, or a HF folder.
    tokenizer: str = "data/tokenizer"
    # Formatting of prompt + response, as for SFT: "auto", "default" or "raw".
    template: str = "auto"
    # Longest prompt + response (tokens, EOS included); a longer completion is invalid.
    seq_len: int = 256
    # Most responses per prompt (K); a row with more is invalid.
    max_k: int = MAX_K
    # Skip invalid rows, logging a count per reason, instead of failing on the first one.
    skip_invalid: bool = False
    # Seed of every epoch's prompt order.
    seed: int = 1234

    def __post_init__(self) -> None:
        _check(
            bool(self.train_files) and all(isinstance(f, str) and f for f in self.train_files),
            "data.train_files",
            f"need at least one path, got {self.train_files!r}",
        )
        _check(
            self.template in TEMPLATES,
            "data.template",
            f"{self.template!r} is not one of {'|'.join(TEMPLATES)}",
        )
        _check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(2 <= self.max_k <= 64, "data.max_k", f"must be in [2, 64], got {self.max_k}")
        _check(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")


@dataclass
class RMConfig:
    """The reward-model loop: batch shape in prompts, length of training, evaluation,
    normalization."""

    # Prompts per micro-batch on each data-parallel rank (all K completions of each are
    # forwarded together, so a micro-batch holds between 2 and max_k times as many sequences).
    micro_batch_size: int = 4
    # Micro-batches per optimizer step on each data-parallel rank. The global batch is
    # micro_batch_size * grad_accum * dp prompts. Ignored when global_batch_size > 0.
    grad_accum: int = 1
    # Prompts per optimizer step over all data-parallel ranks; when > 0 it sets grad_accum =
    # global_batch_size / (micro_batch_size * dp), so one config trains the same at any DP size.
    global_batch_size: int = 0
    # Optimizer steps to train; 0 means rm.epochs full epochs.
    max_steps: int = 0
    # Epochs over the prompts when rm.max_steps is 0 (InstructGPT trains the RM for one).
    epochs: int = 1
    # Seed of the model initialization (the scalar head when starting from an SFT model) and of
    # every per-rank random stream.
    seed: int = 1234
    # Held-out ranking files (same format as data.train_files) for eval_loss / eval_accuracy;
    # empty: no evaluation.
    eval_files: list[str] = field(default_factory=list)
    # Evaluate every N optimizer steps (and after the last); 0: only after the last step.
    eval_every: int = 0
    # Demonstration files (SFT format: {"prompt", "response"} or {"messages"}) whose mean reward
    # is made 0 after training by shifting the head's bias; empty: no normalization.
    normalize_files: list[str] = field(default_factory=list)
    # Sequences per forward when scoring the demonstration files.
    normalize_micro_batch_size: int = 16
    # Pipeline schedule when parallel.pp > 1 (see megarlhf.parallel.pipeline).
    pipeline_schedule: str = "1f1b"
    # Seconds any collective may wait before failing (a dead peer becomes an error, not a hang).
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for k in ("micro_batch_size", "grad_accum", "epochs", "normalize_micro_batch_size"):
            _check(getattr(self, k) >= 1, f"rm.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.global_batch_size >= 0, "rm.global_batch_size", "must be >= 0 (0: off)")
        _check(self.max_steps >= 0, "rm.max_steps", "must be >= 0 (0: use rm.epochs)")
        _check(self.seed >= 0, "rm.seed", "must be >= 0")
        _check(self.eval_every >= 0, "rm.eval_every", "must be >= 0")
        _check(self.dist_timeout_s > 0, "rm.dist_timeout_s", "must be > 0")


@dataclass
class RMRunConfig:
    """Everything `tools/train_rm.py` needs: one YAML file plus dotted overrides."""

    # Shape and family of the model; model.head must be "scalar".
    model: ModelConfig = field(default_factory=lambda: ModelConfig(head="scalar"))
    # Tensor- and pipeline-parallel sizes; data parallelism takes the remaining ranks.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Ranking data and tokenizer.
    data: RMDataConfig = field(default_factory=RMDataConfig)
    # Optimizer and learning-rate schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # ZeRO stage and DeepSpeed communication settings.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # The reward-model loop itself.
    rm: RMConfig = field(default_factory=RMConfig)
    # Checkpointing, resume, and checkpoint.init_from (an SFT or converted HF checkpoint).
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Metrics, TensorBoard, progress bar.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(
            self.model.head == "scalar",
            "model.head",
            f"a reward model needs model.head=scalar, got {self.model.head!r}",
        )
        # One ranking orders one reward; several outputs would need a ranking per attribute.
        _check(
            self.model.num_head_outputs == 1,
            "model.num_head_outputs",
            f"the ranking loss trains one reward, got {self.model.num_head_outputs} outputs",
        )
        check_run_config(self)

    # The loop section under its stage-independent name (the engine and shared loop read it).
    @property
    def loop(self) -> RMConfig:
        return self.rm
