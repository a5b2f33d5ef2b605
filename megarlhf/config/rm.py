"""The reward-model run: the `rm:` section and `RMRunConfig`.

Batches are counted in prompts: a micro-batch holds `rm.micro_batch_size` whole prompts, i.e. all
K completions of each (the number of sequences forwarded varies with K). `max_k` lives under
`data` because the ranking loader validates it (its error message names `data.max_k`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.data import RMDataConfig
from megarlhf.config.loader import check, inline
from megarlhf.config.loop import LoopConfig, PassesConfig, RunSections, resolve_batch
from megarlhf.config.model import ModelConfig
from megarlhf.config.sft import check_run_sections


@dataclass
class RMConfig:
    """The reward-model loop: batch shape in prompts, length of training, evaluation,
    normalization."""

    # Micro-batch (prompts, all K completions of each), steps, seed, schedule, timeout.
    loop: LoopConfig = inline(LoopConfig)
    # Accumulation, global batch (prompts), epochs (InstructGPT trains the RM for one), held-out
    # ranking files.
    passes: PassesConfig = inline(PassesConfig)
    # Demonstration files (SFT format: {"prompt", "response"} or {"messages"}) whose mean reward
    # is made 0 after training by shifting the head's bias; empty: no normalization.
    normalize_files: list[str] = field(default_factory=list)
    # Sequences per forward when scoring the demonstration files.
    normalize_micro_batch_size: int = 16

    def __post_init__(self) -> None:
        n = self.normalize_micro_batch_size
        check(n >= 1, "normalize_micro_batch_size", f"must be >= 1, got {n}")


@dataclass
class RMRunConfig(RunSections):
    """Everything `tools/train_rm.py` needs: one YAML file plus dotted overrides."""

    # Shape and family of the model; model.head must be "scalar".
    model: ModelConfig = field(default_factory=lambda: ModelConfig(head="scalar"))
    # Ranking data and tokenizer.
    data: RMDataConfig = field(default_factory=RMDataConfig)
    # The reward-model loop itself.
    rm: RMConfig = field(default_factory=RMConfig)

    def __post_init__(self) -> None:
        check(
            self.model.head == "scalar",
            "model.head",
            f"a reward model needs model.head=scalar, got {self.model.head!r}",
        )
        # One ranking orders one reward; several outputs would need a ranking per attribute.
        check(
            self.model.num_head_outputs == 1,
            "model.num_head_outputs",
            f"the ranking loss trains one reward, got {self.model.num_head_outputs} outputs",
        )
        check_run_sections(self)

    @property
    def loop(self) -> LoopConfig:
        """The stage's loop section (the launcher and the shared loop read it)."""
        return self.rm.loop

    def resolved_passes(self, dp_size: int) -> PassesConfig:
        """rm.grad_accum for this DP size (derived from rm.global_batch_size, in prompts)."""
        return resolve_batch(self.rm.loop, self.rm.passes, dp_size, "rm", " prompts")
