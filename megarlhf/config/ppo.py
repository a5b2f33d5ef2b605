"""The PPO run: the `ppo:` section (split into the loop, the rollout and the algorithm, all inline
so the YAML keys stay `ppo.<field>`) and `PPORunConfig`.

Model shapes: the actor and reference are `model` (head "lm"); the critic and the reward model
share the actor's trunk shape with a one-output scalar head (the RM checkpoint must match it;
`load_init_weights` names the differing keys before any work). `checkpoint.init_from` is the SFT
checkpoint (actor and reference); `ppo.reward_model` the RM checkpoint (reward model, and the
critic's initialization unless `ppo.critic_init` is set). Empty paths mean a seeded random
initialization (tests and the fresh-clone demo), logged as such.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megarlhf.algos.advantages import ADVANTAGE_ESTIMATORS
from megarlhf.algos.ppo import LOSS_AGGREGATIONS, POLICY_LOSSES, ROLLOUT_CORRECTIONS
from megarlhf.config.data import PPODataConfig
from megarlhf.config.generation import GenerationConfig
from megarlhf.config.loader import check, check_choice, inline
from megarlhf.config.loop import LoopConfig, RunSections
from megarlhf.config.model import ModelConfig
from megarlhf.config.optim import OptimConfig, check_supported
from megarlhf.kernels.kl import KL_ESTIMATORS


@dataclass
class RolloutConfig:
    """What one rollout generates and with which models: the batch, the generation layout, the
    frozen models' paths and placement."""

    # Prompts per PPO step over all ranks (the rollout batch holds samples_per_prompt answers
    # to each).
    rollout_batch_size: int = 16
    # Answers sampled per prompt (K); rloo / grpo need K >= 2.
    samples_per_prompt: int = 1
    # Tensor-parallel size of the generation layout (pipeline size 1, dp = world / this);
    # 0: the training layout's tp * pp.
    generation_tp: int = 0
    # Recompute the old log-probs with a training-layout forward of the actor (and log the
    # mismatch with generation's); false takes generation's log-probs as they are (one actor
    # forward less per step, as TRL does; the entropy metric is then the sampled tokens' mean
    # -log p, a one-sample estimate).
    recompute_old_logprobs: bool = True
    # Reward-model checkpoint (scalar head, bias-normalized); empty: random init (tests only).
    reward_model: str = ""
    # Critic initialization; empty: from ppo.reward_model (as in InstructGPT).
    critic_init: str = ""
    # Keep the frozen reference and reward model in CPU memory between uses (moved to the
    # compute device only for their forwards).
    offload_frozen: bool = False
    # Pack several sequences per row for the experience forwards and the updates (no compute on
    # padding; positions and attention per sequence); false: one sequence per padded row.
    pack_sequences: bool = True
    # Tokens (rows x row width) per forward / backward; 0: ppo.micro_batch_size rows of the
    # longest sequence, the padded layout's size.
    max_tokens_per_micro_batch: int = 0

    def __post_init__(self) -> None:
        check(self.rollout_batch_size >= 1, "rollout_batch_size", "must be >= 1")
        check(self.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch", "must be >= 0")
        check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        check(self.generation_tp >= 0, "generation_tp", "must be >= 0 (0: tp * pp)")


@dataclass
class PPOAlgoConfig:
    """The algorithm: advantages, rewards and their KL penalty and shaping, the losses and their
    corrections, the update epochs, the critic warm-up, PPO-ptx and the EMA."""

    # "gae" (PPO with the critic), or critic-free "rloo" / "grpo" (group baselines over the K
    # answers of a prompt), "reinforce" / "reinforce_baseline" (REINFORCE++, whitened returns;
    # the baseline variant subtracts the group mean first); no critic is built or trained for
    # those. See megarlhf.algos.advantages.
    advantage_estimator: str = "gae"
    # Optimizer steps per PPO epoch: the rollout batch is split into this many minibatches.
    num_minibatches: int = 1
    # Passes over each rollout batch.
    ppo_epochs: int = 1
    # Initial KL coefficient beta (InstructGPT: 0.02).
    kl_coef: float = 0.02
    # Target mean per-sequence KL of the adaptive controller; 0 keeps beta fixed.
    kl_target: float = 0.0
    # Horizon (samples) of the adaptive KL controller.
    kl_horizon: int = 10000
    # Per-token KL estimator of the penalty: "k1" (InstructGPT), "k2" or "k3".
    kl_estimator: str = "k1"
    # Clip RM scores to [-c, c] before adding them (0: off).
    score_clip: float = 0.0
    # Whiten RM scores over the whole rollout batch (all DP ranks) before clipping and adding
    # them; metrics still report the raw scores.
    whiten_rewards: bool = False
    # Subtracted from the score of a response without EOS (it ran to generation.max_new_tokens),
    # before whitening and clipping (TRL's missing_eos_penalty); 0: off.
    missing_eos_penalty: float = 0.0
    # DAPO's soft overlong punishment: a response in the last L_buf tokens before
    # generation.max_new_tokens loses up to ppo.overlong_penalty_factor of its score, linearly
    # in its length (0 at max - L_buf, the factor at max); 0: off.
    overlong_buffer_len: int = 0
    # The overlong penalty at generation.max_new_tokens tokens.
    overlong_penalty_factor: float = 1.0
    # GAE discount.
    gamma: float = 1.0
    # GAE lambda.
    lam: float = 0.95
    # Whiten advantages over the whole rollout batch.
    whiten_advantages: bool = True
    # Policy loss by name (megarlhf.algos.ppo.POLICY_LOSSES): "ppo", the clipped surrogate.
    policy_loss: str = "ppo"
    # How per-token losses reduce to the step's loss: "token-mean" (over every response token of
    # the minibatch), "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm".
    loss_agg: str = "token-mean"
    # PPO clipping range of the probability ratio.
    clip_eps: float = 0.2
    # Dual-clip PPO (Ye et al. 2020): where A < 0 the clipped surrogate is further bounded by
    # -c * A (veRL's clip_ratio_c, e.g. 3.0); 0: off, else > 1.
    dual_clip_c: float = 0.0
    # Rollout importance-sampling correction: "none", or "tis" (each token's policy loss times
    # min(exp(old_logp - gen_logp), ppo.rollout_is_cap), the training-layout over the
    # generation probability; needs ppo.recompute_old_logprobs=true).
    rollout_is: str = "none"
    # The cap C of the truncated importance weights.
    rollout_is_cap: float = 2.0
    # Clipping range of the value update around the old values (0: unclipped).
    value_clip: float = 0.2
    # Entropy bonus coefficient (0: off).
    entropy_coef: float = 0.0
    # PPO steps at the start in which only the critic trains: the actor is frozen (no actor
    # optimizer step, so no EMA fold and no PTX batch drawn) and the KL controller is held; 0: off.
    critic_warmup_steps: int = 0
    # PPO-ptx coefficient gamma of the pretraining next-token loss (InstructGPT: 27.8); 0: off.
    ptx_coef: float = 0.0
    # PTX rows per optimizer step over all training-DP ranks.
    ptx_batch_size: int = 8
    # Decay of an fp32 moving average of the actor's weights, saved with every checkpoint under
    # ema/ (InstructGPT: 0.992); 0: off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.advantage_estimator, ADVANTAGE_ESTIMATORS, "advantage_estimator")
        check_choice(self.kl_estimator, KL_ESTIMATORS, "kl_estimator")
        check_choice(self.policy_loss, POLICY_LOSSES, "policy_loss")
        check_choice(self.loss_agg, LOSS_AGGREGATIONS, "loss_agg")
        for k in ("num_minibatches", "ppo_epochs", "kl_horizon", "ptx_batch_size"):
            check(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(self.kl_target >= 0, "kl_target", "must be >= 0 (0: fixed beta)")
        check(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        check(self.clip_eps > 0, "clip_eps", "must be > 0")
        for k in ("value_clip", "score_clip", "ptx_coef"):
            check(getattr(self, k) >= 0, k, "must be >= 0 (0: off)")
        check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        check(
            self.dual_clip_c == 0 or self.dual_clip_c > 1,
            "dual_clip_c",
            f"must be 0 (off) or > 1 (a bound -c * A below the clipped surrogate), got "
            f"{self.dual_clip_c}",
        )
        check_choice(self.rollout_is, ("none", *ROLLOUT_CORRECTIONS), "rollout_is")
        check(self.rollout_is_cap > 0, "rollout_is_cap", f"must be > 0, got {self.rollout_is_cap}")
        for k in ("missing_eos_penalty", "overlong_buffer_len", "critic_warmup_steps"):
            check(getattr(self, k) >= 0, k, f"must be >= 0 (0: off), got {getattr(self, k)}")
        check(self.overlong_penalty_factor >= 0, "overlong_penalty_factor", "must be >= 0")
        check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass
class PPOConfig:
    """The `ppo:` section: the loop, the rollout and the algorithm (their keys sit side by side)."""

    # Micro-batch (sequences), PPO steps, seed, pipeline schedule, collective timeout.
    loop: LoopConfig = inline(LoopConfig, max_steps=20)
    # The rollout batch and the models that produce and score it.
    rollout: RolloutConfig = inline(RolloutConfig)
    # Advantages, rewards, losses, update epochs, PPO-ptx, EMA.
    algo: PPOAlgoConfig = inline(PPOAlgoConfig)

    def __post_init__(self) -> None:
        check(self.loop.max_steps >= 1, "max_steps", "must be >= 1")
        need = ADVANTAGE_ESTIMATORS[self.algo.advantage_estimator].min_group_size
        k = self.rollout.samples_per_prompt
        check(
            k >= need,
            "samples_per_prompt",
            f"{k}: ppo.advantage_estimator={self.algo.advantage_estimator} needs at least "
            f"{need} answers per prompt",
        )
        a = self.algo
        check(
            a.rollout_is == "none" or self.rollout.recompute_old_logprobs,
            "rollout_is",
            f"{a.rollout_is} weighs the training-layout old log-probs against generation's: it "
            "needs ppo.recompute_old_logprobs=true (else the two are the same and w = 1)",
        )
        if a.critic_warmup_steps:
            check(
                ADVANTAGE_ESTIMATORS[a.advantage_estimator].needs_critic,
                "critic_warmup_steps",
                f"{a.critic_warmup_steps}: ppo.advantage_estimator={a.advantage_estimator} "
                "has no critic to warm up",
            )
            check(
                a.critic_warmup_steps < self.loop.max_steps,
                "critic_warmup_steps",
                f"{a.critic_warmup_steps} >= ppo.max_steps={self.loop.max_steps}: the actor "
                "would never train",
            )


@dataclass
class PPORunConfig(RunSections):
    """Everything `tools/train_ppo.py` needs: one YAML file plus dotted overrides. `model` is the
    actor's shape (head "lm"; the critic and RM share its trunk), `optim` the actor's optimizer,
    `checkpoint.init_from` the SFT checkpoint; ZeRO-3 needs parallel.pp=1."""

    # Actor optimizer and schedule.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    # Prompts, PTX corpus, tokenizer.
    data: PPODataConfig = field(default_factory=PPODataConfig)
    # Sampling of rollouts (its temperature is also the one PPO's log-probs use).
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Critic optimizer and schedule.
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    # The PPO loop.
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        check(
            self.model.head == "lm",
            "model.head",
            f"the actor is a language model: model.head must be lm, got {self.model.head!r}",
        )
        check(
            self.deepspeed.zero_stage < 3 or self.ppo.algo.ema_decay == 0,
            "ppo.ema_decay",
            "the actor EMA averages whole parameters; with deepspeed.zero_stage=3 set it to 0",
        )
        need = self.data.max_prompt_len + self.generation.max_new_tokens
        check(
            need <= self.model.max_seq_len,
            "data.max_prompt_len",
            f"{self.data.max_prompt_len} + generation.max_new_tokens "
            f"{self.generation.max_new_tokens} = {need} exceeds model.max_seq_len="
            f"{self.model.max_seq_len}",
        )
        check(
            self.ppo.algo.overlong_buffer_len <= self.generation.max_new_tokens,
            "ppo.overlong_buffer_len",
            f"{self.ppo.algo.overlong_buffer_len} exceeds generation.max_new_tokens="
            f"{self.generation.max_new_tokens}",
        )
        check(
            self.data.ptx_seq_len <= self.model.max_seq_len,
            "data.ptx_seq_len",
            f"{self.data.ptx_seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        check(
            self.ppo.algo.ptx_coef == 0 or bool(self.data.ptx_files),
            "ppo.ptx_coef",
            f"{self.ppo.algo.ptx_coef} > 0 needs data.ptx_files",
        )
        check_supported(self.deepspeed.zero_stage, self.parallel.pp, self.model.dtype)

    @property
    def loop(self) -> LoopConfig:
        """The stage's loop section (the launcher and the shared loop read it)."""
        return self.ppo.loop

    def critic_model(self) -> ModelConfig:
        """The critic / reward-model shape: the actor's trunk with a one-output scalar head."""
        return dataclasses.replace(self.model, head="scalar", num_head_outputs=1)
