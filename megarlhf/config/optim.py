"""Optimizer and DeepSpeed configuration, and the layout checks DeepSpeed imposes."""

from __future__ import annotations

from dataclasses import dataclass

from megarlhf.config.loader import ConfigError, check, check_choice

OPTIMIZER_IMPLS = ("auto", "torch", "fused", "cpu_adam")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay, and global gradient-norm clipping."""

    # Optimizer implementation: "auto" (CUDA: DeepSpeed FusedAdam when it imports, else torch's
    # fused AdamW; CPU: torch's fused AdamW for bf16 models, the plain torch.optim.AdamW for fp32
    # ones, which the exactness tests compare against), "torch" (always the plain AdamW),
    # "fused" (torch's fused AdamW), "cpu_adam" (DeepSpeed's C++ CPU Adam, built just-in-time on
    # first use and cached; 1.3x torch's fused step on CPU, see docs/bench.md).
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
    # A scalar head's (reward model, critic) learning rate as a multiple of lr, through the same
    # warmup and decay. A fresh head on a pretrained trunk starts at zero signal: at a trunk's
    # fine-tuning rate (1e-5..1e-4) Adam moves each head weight by at most lr per step, too
    # little for the score to spread in the few hundred steps of an RM run. 1: one rate for all.
    head_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.impl, OPTIMIZER_IMPLS, "impl")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr], got {self.min_lr}")
        for k in ("warmup_steps", "decay_steps", "weight_decay"):
            check(getattr(self, k) >= 0, k, f"must be >= 0, got {getattr(self, k)}")
        for k in ("beta1", "beta2"):
            check(0 <= getattr(self, k) < 1, k, f"must be in [0, 1), got {getattr(self, k)}")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables clipping)")
        check(self.head_lr_scale > 0, "head_lr_scale", f"must be > 0, got {self.head_lr_scale}")


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
        check(
            self.zero_stage in (0, 1, 2, 3),
            "zero_stage",
            f"{self.zero_stage} is not one of 0, 1, 2, 3",
        )
        for k in ("reduce_bucket_size", "allgather_bucket_size"):
            check(getattr(self, k) > 0, k, "must be > 0")


def check_supported(zero_stage: int, pp: int, dtype: str = "fp32") -> None:
    """Refuse layouts DeepSpeed cannot drive, before any process group exists.

    ZeRO-3 partitions every parameter over the data-parallel group and gathers it in module
    forward hooks; a pipeline stage's backward runs from p2p gradients outside any module call,
    so DeepSpeed itself supports ZeRO-3 only without pipeline parallelism. DeepSpeed's stage-0
    bf16 path keeps bf16 gradients without fp32 master weights.
    """
    if zero_stage == 3 and pp > 1:
        raise ConfigError(
            f"deepspeed.zero_stage: 3 is not supported with parallel.pp={pp} (DeepSpeed gathers "
            "ZeRO-3 parameters per module call, which a pipelined backward bypasses); use "
            "deepspeed.zero_stage=1 or 2 with pipeline parallelism, or parallel.pp=1"
        )
    if zero_stage == 0 and dtype == "bf16":
        raise ConfigError(
            "deepspeed.zero_stage: 0 runs fp32 only (DeepSpeed's stage-0 bf16 path keeps bf16 "
            "gradients without fp32 master weights); use deepspeed.zero_stage>=1 with "
            "model.dtype=bf16"
        )
