"""The SFT run: the `sft:` section and `SFTRunConfig`, everything `tools/train_sft.py` loads from
one YAML file plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.data import DataConfig
from megarlhf.config.loader import check, inline
from megarlhf.config.loop import LoopConfig, PassesConfig, RunSections, resolve_batch
from megarlhf.config.optim import check_supported


@dataclass
class SFTConfig:
    """The supervised fine-tuning loop: batch shape (in packed rows), steps, seed, evaluation."""

    # Micro-batch, steps, seed, pipeline schedule, collective timeout.
    loop: LoopConfig = inline(LoopConfig)
    # Accumulation, global batch, epochs, held-out evaluation.
    passes: PassesConfig = inline(PassesConfig)


def check_run_sections(cfg) -> None:
    """Checks across sections that the SFT and RM run configs share."""
    check(
        cfg.data.seq_len <= cfg.model.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    check_supported(cfg.deepspeed.zero_stage, cfg.parallel.pp, cfg.model.dtype)


@dataclass
class SFTRunConfig(RunSections):
    """Everything `tools/train_sft.py` needs: one YAML file plus dotted overrides."""

    # Training data, tokenizer and packing.
    data: DataConfig = field(default_factory=DataConfig)
    # The SFT loop itself.
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        check_run_sections(self)

    @property
    def loop(self) -> LoopConfig:
        """The stage's loop section (the launcher and the shared loop read it)."""
        return self.sft.loop

    def resolved_passes(self, dp_size: int) -> PassesConfig:
        """sft.grad_accum for this DP size (derived from sft.global_batch_size when set)."""
        return resolve_batch(self.sft.loop, self.sft.passes, dp_size, "sft", "")
