"""The DPO run: the `dpo:` section and `DPORunConfig`, everything `tools/train_dpo.py` loads from
one YAML file plus dotted overrides.

The data is the reward model's (`data:` is an `RMDataConfig`: K-way rankings or pairs in any of
its formats) and batches are counted in prompts, as for the RM; the model is a language model
(head "lm"), started from `checkpoint.init_from` (the SFT checkpoint), which is also the frozen
reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.algos.dpo import PREFERENCE_LOSSES
from megarlhf.config.data import RMDataConfig
from megarlhf.config.loader import check, check_choice, inline
from megarlhf.config.loop import LoopConfig, PassesConfig, RunSections, resolve_batch
from megarlhf.config.model import ModelConfig
from megarlhf.config.sft import check_run_sections


@dataclass
class PreferenceLossConfig:
    """Which preference loss, and its temperature."""

    # "dpo" (-log sigmoid(beta * margin), Rafailov et al. 2023) or "ipo" ((margin - 1/(2 beta))^2,
    # Azar et al. 2023); margin = (log pi_w - log ref_w) - (log pi_l - log ref_l).
    loss: str = "dpo"
    # Temperature of the implicit reward beta * log(pi / ref): DPO's KL coefficient, IPO's tau.
    beta: float = 0.1
    # Conservative DPO: the probability that a pair's label is wrong (dpo only); 0: plain DPO.
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.loss, PREFERENCE_LOSSES, "loss")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        ls = self.label_smoothing
        check(0 <= ls < 0.5, "label_smoothing", f"must be in [0, 0.5), got {ls}")
        check(
            ls == 0 or self.loss == "dpo",
            "label_smoothing",
            f"{ls} applies to dpo.loss=dpo only (got dpo.loss={self.loss})",
        )


@dataclass
class DPOConfig:
    """The DPO loop: batch shape in prompts, length of training, evaluation, the loss, and where
    the reference log-probs come from."""

    # Micro-batch (prompts, all K completions of each), steps, seed, schedule, timeout.
    loop: LoopConfig = inline(LoopConfig)
    # Accumulation, global batch (prompts), epochs, held-out ranking files.
    passes: PassesConfig = inline(PassesConfig)
    # The loss, beta, label smoothing.
    algo: PreferenceLossConfig = inline(PreferenceLossConfig)
    # Compute the reference log-probs of every training completion in one pass before step 1
    # (kept per completion, saved with each checkpoint) and free the reference model; false:
    # the frozen reference forwards every batch alongside the policy.
    precompute_reference: bool = False


@dataclass
class DPORunConfig(RunSections):
    """Everything `tools/train_dpo.py` needs: one YAML file plus dotted overrides."""

    # Shape and family of the policy (and of the reference); model.head must be "lm".
    model: ModelConfig = field(default_factory=ModelConfig)
    # Ranking data (the reward model's formats) and tokenizer.
    data: RMDataConfig = field(default_factory=RMDataConfig)
    # The DPO loop itself.
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        check(
            self.model.head == "lm",
            "model.head",
            f"DPO trains a language model, needs model.head=lm, got {self.model.head!r}",
        )
        check_run_sections(self)

    @property
    def loop(self) -> LoopConfig:
        """The stage's loop section (the launcher and the shared loop read it)."""
        return self.dpo.loop

    def resolved_passes(self, dp_size: int) -> PassesConfig:
        """dpo.grad_accum for this DP size (derived from dpo.global_batch_size, in prompts)."""
        return resolve_batch(self.dpo.loop, self.dpo.passes, dp_size, "dpo", " prompts")
