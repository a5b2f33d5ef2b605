"""Configuration of the PPO stage: prompts and the PTX corpus, the PPO loop, and the run that
composes them with the shared model / parallel / optimizer / DeepSpeed / checkpoint / logging
sections.

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

from megarlhf.config import ConfigError, GenerationConfig, ModelConfig, ParallelConfig
from megarlhf.data.tokenizer import TEMPLATES
from megarlhf.trainers.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    OptimConfig,
    check_supported,
)

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class PPODataConfig:
    """Prompts to answer, the pretraining (PTX) corpus, tokenizer and formatting."""

    # JSONL files of {"prompt": str} rows (other keys, e.g. "response", are ignored).
    prompt_files: list[str] = field(default_factory=lambda: ["data/ppo_prompts_tiny.jsonl"])
    # Plain-text files for the PTX loss, one document per non-empty line; empty: no PTX data.
    ptx_files: list[str] = field(default_factory=list)
    # Tokenizer: a sentencepiece .model file, a folder with tokenizer.model, or a HF folder.
    tokenizer: str = "data/tokenizer"
    # Formatting of a prompt, as in SFT: "auto", "default" or "raw".
    template: str = "auto"
    # Longest tokenized prompt; prompt + generation.max_new_tokens must fit model.max_seq_len.
    max_prompt_len: int = 64
    # Tokens per PTX sequence (documents are concatenated and cut into rows of this length).
    ptx_seq_len: int = 64
    # Seed of every epoch's prompt order and of the PTX row order.
    seed: int = 1234

    def __post_init__(self) -> None:
        _check(
            bool(self.prompt_files) and all(isinstance(f, str) and f for f in self.prompt_files),
            "data.prompt_files",
            f"need at least one path, got {self.prompt_files!r}",
        )
        _check(
            self.template in TEMPLATES,
            "data.template",
            f"{self.template!r} is not one of {'|'.join(TEMPLATES)}",
        )
        _check(self.max_prompt_len >= 1, "data.max_prompt_len", "must be >= 1")
        _check(self.ptx_seq_len >= 2, "data.ptx_seq_len", "must be >= 2")
        _check(self.seed >= 0, "data.seed", "must be >= 0")


@dataclass
class PPOConfig:
    """The PPO loop: batch shape, rewards, advantages, losses, and the frozen models' paths."""

    # Prompts per PPO step over all ranks (the rollout batch holds samples_per_prompt answers
    # to each).
    rollout_batch_size: int = 16
    # Answers sampled per prompt (K); rloo / grpo need K >= 2.
    samples_per_prompt: int = 1
    # "gae" (PPO with the critic), or critic-free "rloo" / "grpo" (group baselines over the K
    # answers of a prompt; no critic is built or trained).
    advantage_estimator: str = "gae"
    # Sequences per forward / backward on each training-DP rank.
    micro_batch_size: int = 4
    # Optimizer steps per PPO epoch: the rollout batch is split into this many minibatches.
    num_minibatches: int = 1
    # Passes over each rollout batch.
    ppo_epochs: int = 1
    # PPO steps (rollout + update) to run.
    max_steps: int = 20
    # Seed of the model initializations (when a path is empty) and of every per-rank stream.
    seed: int = 1234
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
    # GAE discount.
    gamma: float = 1.0
    # GAE lambda.
    lam: float = 0.95
    # Whiten advantages over the whole rollout batch.
    whiten_advantages: bool = True
    # PPO clipping range of the probability ratio.
    clip_eps: float = 0.2
    # Clipping range of the value update around the old values (0: unclipped).
    value_clip: float = 0.2
    # Entropy bonus coefficient (0: off).
    entropy_coef: float = 0.0
    # PPO-ptx coefficient gamma of the pretraining next-token loss (InstructGPT: 27.8); 0: off.
    ptx_coef: float = 0.0
    # PTX rows per optimizer step over all training-DP ranks.
    ptx_batch_size: int = 8
    # Tensor-parallel size of the generation layout (pipeline size 1, dp = world / this);
    # 0: the training layout's tp * pp.
    generation_tp: int = 0
    # Decay of an fp32 moving average of the actor's weights, saved with every checkpoint under
    # ema/ (InstructGPT: 0.992); 0: off.
    ema_decay: float = 0.0
    # Reward-model checkpoint (scalar head, bias-normalized); empty: random init (tests only).
    reward_model: str = ""
    # Critic initialization; empty: from ppo.reward_model (as in InstructGPT).
    critic_init: str = ""
    # Recompute the old log-probs with a training-layout forward of the actor (and log the
    # mismatch with generation's); false takes generation's log-probs as they are (one actor
    # forward less per step, as TRL does; the entropy metric is then the sampled tokens' mean
    # -log p, a one-sample estimate).
    recompute_old_logprobs: bool = True
    # Keep the frozen reference and reward model in CPU memory between uses (moved to the
    # compute device only for their forwards).
    offload_frozen: bool = False
    # Pipeline schedule when parallel.pp > 1.
    pipeline_schedule: str = "1f1b"
    # Seconds any collective may wait before failing (a dead peer becomes an error, not a hang).
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for k in ("rollout_batch_size", "micro_batch_size", "num_minibatches", "ppo_epochs"):
            _check(getattr(self, k) >= 1, f"ppo.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.max_steps >= 1, "ppo.max_steps", "must be >= 1")
        _check(
            self.advantage_estimator in ADVANTAGE_ESTIMATORS,
            "ppo.advantage_estimator",
            f"{self.advantage_estimator!r} is not one of {'|'.join(ADVANTAGE_ESTIMATORS)}",
        )
        _check(self.samples_per_prompt >= 1, "ppo.samples_per_prompt", "must be >= 1")
        _check(
            self.advantage_estimator == "gae" or self.samples_per_prompt >= 2,
            "ppo.samples_per_prompt",
            f"{self.samples_per_prompt}: ppo.advantage_estimator={self.advantage_estimator} "
            "needs at least 2 answers per prompt",
        )
        _check(self.kl_coef >= 0, "ppo.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(self.kl_target >= 0, "ppo.kl_target", "must be >= 0 (0: fixed beta)")
        _check(self.kl_horizon >= 1, "ppo.kl_horizon", "must be >= 1")
        _check(
            self.kl_estimator in KL_ESTIMATORS,
            "ppo.kl_estimator",
            f"{self.kl_estimator!r} is not one of {'|'.join(KL_ESTIMATORS)}",
        )
        _check(0 <= self.gamma <= 1, "ppo.gamma", f"must be in [0, 1], got {self.gamma}")
        _check(0 <= self.lam <= 1, "ppo.lam", f"must be in [0, 1], got {self.lam}")
        _check(self.clip_eps > 0, "ppo.clip_eps", "must be > 0")
        _check(self.value_clip >= 0, "ppo.value_clip", "must be >= 0 (0: off)")
        _check(self.entropy_coef >= 0, "ppo.entropy_coef", "must be >= 0")
        _check(self.ptx_coef >= 0, "ppo.ptx_coef", "must be >= 0 (0: off)")
        _check(self.ptx_batch_size >= 1, "ppo.ptx_batch_size", "must be >= 1")
        _check(0 <= self.ema_decay < 1, "ppo.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.score_clip >= 0, "ppo.score_clip", "must be >= 0 (0: off)")
        _check(self.generation_tp >= 0, "ppo.generation_tp", "must be >= 0 (0: tp * pp)")
        _check(self.dist_timeout_s > 0, "ppo.dist_timeout_s", "must be > 0")


@dataclass
class PPORunConfig:
    """Everything `tools/train_ppo.py` needs: one YAML file plus dotted overrides."""

    # Shape of the actor / reference (head "lm"); the critic and RM share its trunk.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Training layout (tensor- and pipeline-parallel sizes; DP takes the remaining ranks).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Prompts, PTX corpus, tokenizer.
    data: PPODataConfig = field(default_factory=PPODataConfig)
    # Sampling of rollouts (its temperature is also the one PPO's log-probs use).
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Actor optimizer and schedule.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    # Critic optimizer and schedule.
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    # ZeRO stage and DeepSpeed settings, for both trained models (ZeRO-3 needs parallel.pp=1).
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # The PPO loop.
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # Final checkpoint and checkpoint.init_from (the SFT checkpoint).
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Metrics, TensorBoard, progress bar.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(
            self.model.head == "lm",
            "model.head",
            f"the actor is a language model: model.head must be lm, got {self.model.head!r}",
        )
        _check(
            self.deepspeed.zero_stage < 3 or self.ppo.ema_decay == 0,
            "ppo.ema_decay",
            "the actor EMA averages whole parameters; with deepspeed.zero_stage=3 set it to 0",
        )
        need = self.data.max_prompt_len + self.generation.max_new_tokens
        _check(
            need <= self.model.max_seq_len,
            "data.max_prompt_len",
            f"{self.data.max_prompt_len} + generation.max_new_tokens "
            f"{self.generation.max_new_tokens} = {need} exceeds model.max_seq_len="
            f"{self.model.max_seq_len}",
        )
        _check(
            self.data.ptx_seq_len <= self.model.max_seq_len,
            "data.ptx_seq_len",
            f"{self.data.ptx_seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        _check(
            self.ppo.ptx_coef == 0 or bool(self.data.ptx_files),
            "ppo.ptx_coef",
            f"{self.ppo.ptx_coef} > 0 needs data.ptx_files",
        )
        check_supported(self.deepspeed.zero_stage, self.parallel.pp)

    @property
    def loop(self) -> PPOConfig:
        """The loop section under its stage-independent name (the launcher reads it)."""
        return self.ppo

    def critic_model(self) -> ModelConfig:
        """The critic / reward-model shape: the actor's trunk with a one-output scalar head."""
        return dataclasses.replace(self.model, head="scalar", num_head_outputs=1)


@dataclass
class _EngineLoop:
    micro_batch_size: int
    grad_accum: int


@dataclass
class EngineConfig:
    """What `TrainEngine` reads of a run config, for one trained model (actor or critic)."""

    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    loop: _EngineLoop


def engine_config(cfg: PPORunConfig, which: str) -> EngineConfig:
    """TrainEngine's view of the run for the "actor" or the "critic"."""
    model = cfg.model if which == "actor" else cfg.critic_model()
    optim = cfg.optim if which == "actor" else cfg.critic_optim
    loop = _EngineLoop(cfg.ppo.micro_batch_size, 1)
    return EngineConfig(model, cfg.parallel, optim, cfg.deepspeed, loop)
