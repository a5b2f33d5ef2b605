"""The PPO stage (InstructGPT's third): rollout -> experience -> update, with PPO-ptx.

Roles, each a separate object composed here:
  actor      GPTModel (lm head) in the training layout, trained by its own DeepSpeedModel;
  reference  frozen copy of the SFT weights (a FrozenModel), training layout, no optimizer;
             under LoRA (model.lora.rank > 0) the actor itself with its adapters off
             (`AdaptersOffReference`: the frozen base is the SFT model, so no second copy);
  critic     GPTModel (scalar head) initialized from the reward model, its own DeepSpeedModel;
             built only when the advantage estimator needs one (`ADVANTAGE_ESTIMATORS`); under
             LoRA it trains adapters of the same model.lora and its scalar head;
  reward     a scorer: the frozen, bias-normalized reward model, or a `reward_fn` rule;
  rollout    the HybridEngine: re-shards the actor into the generation layout, generates, releases;
  experience the ExperienceMaker (engine/experience.py): old and reference log-probs, values,
             scores, rewards, advantages, as a typed `Experience`.

One PPO step (every rank): `rollout` of `ppo.rollout_batch_size` prompts (each rank keeps its
training-DP slice), `make` the experience, then `update_actor` and `update_critic`: each runs
`ppo.ppo_epochs` x `ppo.num_minibatches` optimizer steps (the clipped surrogate plus, in the SAME
actor step, `ptx_coef` x the next-token loss on a PTX batch of its own; the clipped value loss).
Losses are per-token terms reduced by `algos.ppo.aggregate` with a normalizer over the whole
minibatch (all micro-batches, all DP ranks), so gradients are the same at any DP size or
micro-batch split (DeepSpeedModel sums over micro-batches and DP).

Critic warm-up (`ppo.critic_warmup_steps` = N): in the first N PPO steps the rollout and the
experience are made as usual and the critic trains, but the actor takes no optimizer step; so no
EMA fold, no PTX batch is drawn (the PTX stream starts with the first actor step), the actor's LR
schedule does not advance (it spans the max_steps - N steps that train the actor) and the KL
controller is held (the policy did not move, so its KL says nothing about beta). All of it is a
function of the saved step counter and states, so a resume inside or across the warm-up is exact.

The step cadence (metrics, saving, hooks, fault injection, resume) is the shared `TrainLoop`;
checkpoints hold actor and critic with their optimizers, the data positions, the KL controller,
the EMA and every RNG, so a run resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megarlhf.algos.advantages import ADVANTAGE_ESTIMATORS
from megarlhf.algos.kl_controller import KLController
from megarlhf.algos.ppo import (
    POLICY_LOSSES,
    aggregate,
    clipped_value_loss,
    entropy_bonus,
    loss_normalizer,
    ptx_loss,
    token_weights,
)
from megarlhf.checkpoint import training as ckpt
from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.checkpoint.model_shards import read_meta
from megarlhf.config import ConfigError
from megarlhf.config.ppo import PPORunConfig
from megarlhf.data.prompts import (
    global_batch_sampler,
    load_prompts,
    load_ptx_rows,
    next_global_batch,
)
from megarlhf.engine.experience import (
    Experience,
    ExperienceMaker,
    MicroBatching,
    RewardFunctionScorer,
    RewardModelScorer,
    micro_batches,
    packed_logprobs,
    scalar_output,
)
from megarlhf.engine.hybrid import HybridEngine, slice_bounds
from megarlhf.engine.offload import FrozenModel
from megarlhf.kernels import logprobs_from_logits
from megarlhf.model.gpt import GPTModel
from megarlhf.model.lora import AdaptersOffReference, base_config
from megarlhf.optim.deepspeed_model import DeepSpeedModel
from megarlhf.optim.ema import EMA
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.scalars import sum_over_dp, sum_over_replicas
from megarlhf.parallel.state import ParallelState, build_parallel_state
from megarlhf.trainers.loop import (
    TrainerHooks,
    TrainLoop,
    checked_tokenizer,
    resume_point,
    seed_everything,
)
from megarlhf.utils.timing import StageTimer

logger = logging.getLogger(__name__)

# reward_fn(prompts, responses) -> one float per sample: replaces the reward model (toy rewards).
RewardFn = Callable[[list[list[int]], list[list[int]]], list[float]]


@dataclass
class PPOCounters:
    """Progress counters saved with every checkpoint."""

    # PPO steps (rollout + update) completed.
    step: int = 0
    # Responses generated (all ranks).
    samples: int = 0
    # Response tokens generated (all ranks).
    response_tokens: int = 0


class PPOTrainer(TrainLoop):
    """PPO training of one run (one output directory); see the module docstring.

    Args:
        cfg: the run config.
        ps: this rank's training layout (process groups already built).
        output_dir: metrics, TensorBoard files, config, checkpoints.
        hooks: optional callbacks.
        reward_fn: optional rule reward replacing the reward model.
        prompts: optional in-memory prompt token ids replacing data.prompt_files (benchmarks:
            synthetic prompts, no data files).
        stop_at_eos: False makes every response exactly generation.max_new_tokens long (the
            benchmark's fixed work per step); True stops a row at the tokenizer's EOS.
    """

    throughput_field = "response_tokens"

    def __init__(
        self,
        cfg: PPORunConfig,
        ps: ParallelState,
        output_dir: str | Path,
        hooks: TrainerHooks | None = None,
        reward_fn: RewardFn | None = None,
        prompts: list[list[int]] | None = None,
        stop_at_eos: bool = True,
    ):
        super().__init__(cfg, ps, output_dir, hooks)
        self.reward_fn = reward_fn
        self.given_prompts, self.stop_at_eos = prompts, stop_at_eos
        self.loop_cfg, self.rollout_cfg, self.algo = cfg.ppo.loop, cfg.ppo.rollout, cfg.ppo.algo

    # ----------------------------------------------------------------------------- set-up

    def _generation_tp(self) -> int:
        """The generation layout's TP size, after checking the batch splits over the layouts."""
        r, a, ps = self.rollout_cfg, self.algo, self.ps
        dp = ps.dp_size
        if r.rollout_batch_size * r.samples_per_prompt % (dp * a.num_minibatches):
            raise ConfigError(
                f"ppo.rollout_batch_size: {r.rollout_batch_size} prompts x "
                f"ppo.samples_per_prompt {r.samples_per_prompt} is not a multiple of training "
                f"dp * ppo.num_minibatches = {dp} * {a.num_minibatches}"
            )
        if a.ptx_coef > 0 and a.ptx_batch_size % dp:
            raise ConfigError(
                f"ppo.ptx_batch_size: {a.ptx_batch_size} is not a multiple of dp={dp}"
            )
        gen_tp = r.generation_tp or ps.tp_size * ps.pp_size
        if ps.world_size % gen_tp:
            raise ConfigError(
                f"ppo.generation_tp: {gen_tp} does not divide the world size {ps.world_size}"
            )
        return gen_tp

    def _build_data(self) -> None:
        d, a, tok = self.cfg.data, self.algo, self.tokenizer
        if self.given_prompts is not None:
            self.prompts = [list(x) for x in self.given_prompts]
        else:
            self.prompts = load_prompts(
                d.prompt_files, tok, d.text.template, d.max_prompt_len, d.rows
            )
        self.sampler = global_batch_sampler(
            len(self.prompts), self.rollout_cfg.rollout_batch_size, d.seed,
            "ppo.rollout_batch_size",
        )  # fmt: skip
        self.ptx_rows = self.ptx_sampler = None
        if a.ptx_coef > 0:
            self.ptx_rows = load_ptx_rows(d.ptx_files, tok, d.ptx_seq_len)
            self.ptx_sampler = global_batch_sampler(
                len(self.ptx_rows), a.ptx_batch_size, d.seed + 1, "ppo.ptx_batch_size"
            )
        rm_path = self.rollout_cfg.reward_model
        if rm_path and read_meta(rm_path).model.head != "scalar":
            raise ConfigError(f"ppo.reward_model: {rm_path} is not a scalar-head (reward) model")

    def _model(self, cfg, seed: int, path: str, what: str) -> GPTModel:
        model = GPTModel(cfg, self.ps, seed=seed)
        if path:
            load_init_weights(model, path, self.ps)
        else:
            logger.warning("%s: no checkpoint given, random initialization (tests / demos)", what)
        return model

    def _trained(self, module: GPTModel, optim, frozen_steps: int = 0) -> DeepSpeedModel:
        """`module` under DeepSpeed; its LR schedule spans the PPO steps after `frozen_steps`."""
        lp, a = self.loop_cfg, self.algo
        return DeepSpeedModel(
            module,
            self.ps,
            optim=optim,
            deepspeed=self.cfg.deepspeed,
            micro_batch_size=lp.micro_batch_size,
            grad_accum=1,
            total_steps=(lp.max_steps - frozen_steps) * a.ppo_epochs * a.num_minibatches,
        )

    def _build_models(self) -> None:
        """Actor, reference, critic (when the estimator needs one), reward; their engines."""
        cfg, r, seed = self.cfg, self.rollout_cfg, self.loop_cfg.seed
        fresh = self.resumed_from is None
        init = cfg.checkpoint.init_from
        actor = self._model(cfg.model, seed, init if fresh else "", "actor (checkpoint.init_from)")
        reference = None  # LoRA: the actor's own base (adapters off), no second copy
        if not cfg.model.lora.enabled:
            reference = self._model(cfg.model, seed, init, "reference (checkpoint.init_from)")
        critic = None
        if ADVANTAGE_ESTIMATORS[self.algo.advantage_estimator].needs_critic:
            path = (r.critic_init or r.reward_model) if fresh else ""
            critic = self._model(cfg.critic_model(), seed + 1, path, "critic (ppo.critic_init / "
                                 "ppo.reward_model)")  # fmt: skip
        reward_model = None
        if self.reward_fn is None:
            what = "reward model (ppo.reward_model)"
            # Frozen: never adapted (a LoRA reward-model checkpoint reads as its merged model).
            reward_model = self._model(base_config(cfg.critic_model()), seed + 1, r.reward_model,
                                       what)  # fmt: skip
        self.actor = self._trained(actor, cfg.optim, self.algo.critic_warmup_steps)
        self.critic = self._trained(critic, cfg.critic_optim) if critic is not None else None
        # Frozen models run where the actor runs; optionally parked in CPU memory between uses.
        device = next(self.actor.module.parameters()).device
        self.reference = (
            AdaptersOffReference(self.actor.module)
            if reference is None
            else FrozenModel(reference, device, r.offload_frozen)
        )
        if reward_model is not None:
            self.scorer = RewardModelScorer(FrozenModel(reward_model, device, r.offload_frozen))
        else:
            self.scorer = RewardFunctionScorer(self.reward_fn)

    def build(self) -> None:
        """Data, the four models, both engines, the hybrid engine. Errors come before any work."""
        cfg, ps, a = self.cfg, self.ps, self.algo
        gen_tp = self._generation_tp()
        seed_everything(self.loop_cfg.seed, ps)
        self.tokenizer = checked_tokenizer(cfg.data.text.tokenizer, cfg.model.vocab_size)
        self._build_data()
        self.resumed_from = resume_point(self.output_dir, cfg, ps)
        self._build_models()
        self.gen_ps = build_parallel_state(gen_tp, 1, ps.timeout_s, name="generation")
        eos = self.tokenizer.eos_id if self.stop_at_eos else None
        tok = self.tokenizer
        self.hybrid = HybridEngine(
            self.actor.module, self.gen_ps, cfg.generation, eos, tok.pad_id, tok.vocab_size
        )
        self.kl_ctl = KLController(a.kl_coef, a.kl_target or None, a.kl_horizon)
        self.fwd_bwd = get_forward_backward_func(ps, self.loop_cfg.pipeline_schedule)
        self.temperature = cfg.generation.temperature or 1.0
        r = self.rollout_cfg
        self.batching = MicroBatching(
            pack=r.pack_sequences,
            max_tokens=r.max_tokens_per_micro_batch,
            rows=self.loop_cfg.micro_batch_size,
            pad_id=self.tokenizer.pad_id,
            device=str(self.actor.device),
        )
        self.maker = ExperienceMaker(
            actor=self.actor, reference=self.reference, critic=self.critic, scorer=self.scorer,
            kl_ctl=self.kl_ctl, algo=a, ps=ps, fwd_bwd=self.fwd_bwd,
            batching=self.batching, temperature=self.temperature,
            group_size=self.rollout_cfg.samples_per_prompt,
            recompute_old_logprobs=self.rollout_cfg.recompute_old_logprobs,
            eos_id=self.tokenizer.eos_id,
        )  # fmt: skip
        self.total_steps = self.loop_cfg.max_steps
        self.counters = PPOCounters()
        self.ema = EMA(self.actor.module, a.ema_decay) if a.ema_decay > 0 else None
        if self.resumed_from is not None:
            models = {"": self.actor, **({"critic": self.critic} if self.critic else {})}
            self.load_state(ckpt.load_checkpoint(self.resumed_from, models=models, ps=ps))
            logger.info("resumed from %s at step %d", self.resumed_from, self.counters.step)

    # ----------------------------------------------------------------------------- state

    def loop_state(self) -> dict:
        """This rank's loop state saved with every checkpoint (models go separately)."""
        return {
            "sampler": self.sampler.state_dict(),
            "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler else None,
            "kl_ctl": self.kl_ctl.state_dict(),
            "ema": self.ema.shadow if self.ema is not None else None,
        }

    def load_state(self, state: dict) -> None:
        self.counters = PPOCounters(**state["counters"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ptx_sampler is not None and state["ptx_sampler"] is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("ppo.ema_decay: > 0, but the checkpoint has no EMA to resume")
            self.ema.load_state_dict(state["ema"])

    def rng_trackers(self) -> dict:
        out = {"actor_tp": self.actor.module.rng}
        if self.critic is not None:
            out["critic_tp"] = self.critic.module.rng
        return out

    def save(self) -> Path:
        models = {"": self.actor, **({"critic": self.critic} if self.critic else {})}
        return ckpt.save_checkpoint(
            self.ckpt_root,
            models=models,
            ps=self.ps,
            counters=self.counters_state(),
            loop_state=self.loop_state(),
            trackers=self.rng_trackers(),
            run_config=self.cfg,
            keep_last=self.cfg.checkpoint.keep_last,
            stage="ppo",
            extra_weights={"ema": self.ema.state_dict()} if self.ema is not None else None,
            before_commit=self.hooks.before_checkpoint_commit,
            model_only=self.cfg.checkpoint.save_only_model,
        )

    # ----------------------------------------------------------------------------- one step

    def train_step(self) -> dict:
        """One PPO step: rollout -> experience -> update; returns the step's metrics."""
        timer = StageTimer()
        samples, width = self.rollout()
        beta = self.kl_ctl.beta
        exp, rec = self.maker.make(
            samples, width, self.cfg.generation.max_new_tokens, self.tokenizer.pad_id, timer
        )
        frozen = self.actor_frozen
        with timer("time_update_actor"):
            rec.update(self.update_actor(exp))
        with timer("time_update_critic"):
            rec.update(self.update_critic(exp))
        if not frozen:  # held during the critic warm-up: the policy did not move
            self.kl_ctl.update(rec["kl"], self.rollout_cfg.rollout_batch_size * self.group_size)
        if self.algo.critic_warmup_steps:
            rec["actor_frozen"] = float(frozen)
        rec.update(self.hybrid.timings, kl_coef=beta, **timer.times)
        return rec

    @property
    def actor_frozen(self) -> bool:
        """True in the critic warm-up: this PPO step trains the critic only."""
        return self.counters.step < self.algo.critic_warmup_steps

    @property
    def group_size(self) -> int:
        return self.rollout_cfg.samples_per_prompt

    def rollout(self):
        """Generate answers to the next prompts; returns this DP rank's samples and the prompt
        width of the whole rollout batch."""
        k = self.group_size
        batch = next_global_batch(self.sampler)
        prompts = [self.prompts[i] for i in batch for _ in range(k)]
        samples = self.hybrid.rollout(prompts, self.counters.step)
        width = max(len(s.prompt) for s in samples)
        lo, hi = slice_bounds(len(samples), self.ps.dp_rank, self.ps.dp_size)
        return samples[lo:hi], width

    def minibatches(self, exp: Experience):
        """The rollout batch's minibatches, `ppo_epochs` times over (one optimizer step each)."""
        per = exp.rows // self.algo.num_minibatches
        for _ in range(self.algo.ppo_epochs):
            for m in range(self.algo.num_minibatches):
                yield exp.select(m * per, (m + 1) * per)

    def normalizer(self, part: Experience) -> float:
        """The loss denominator of one optimizer step over `part` (all DP ranks)."""
        return loss_normalizer([part.mask], self.algo.loss_agg, lambda v: sum_over_dp(v, self.ps))

    # ----------------------------------------------------------------------------- updates

    def update_actor(self, exp: Experience) -> dict:
        """The actor's optimizer steps over the experience (each with its PTX batch); none in
        the critic warm-up."""
        names = ("pg", "clip", "akl", "dual", "ptx")
        sums = dict.fromkeys((*names, "tokens", "ptx_tokens"), 0.0)
        grad_norms = []
        for part in () if self.actor_frozen else self.minibatches(exp):
            weights = token_weights(part.mask, self.algo.loss_agg)
            per_token = {"old_logprobs": part.old_logprobs, "advantages": part.advantages,
                         "weights": weights, "mask": part.mask}  # fmt: skip
            if part.is_weights is not None:
                per_token["is_weights"] = part.is_weights
            mbs = micro_batches(part, self.batching, self.ps, per_token)
            norm = self.normalizer(part)
            ptx_mbs, ptx_norm = self.ptx_micro_batches()
            self.actor.begin_step(len(mbs) + len(ptx_mbs))
            st = self._run(self.actor, mbs, self._policy_loss_fn(norm))
            pst = self._run(self.actor, ptx_mbs, self._ptx_loss_fn(ptx_norm)) if ptx_mbs else []
            grad_norms.append(self.actor.step()["grad_norm"])
            if self.ema is not None:
                self.ema.update()
            local = [sum(s[k] for s in st) for k in names[:-1]]
            local.append(sum(s["ptx"] for s in pst))
            totals = sum_over_replicas(local, self.ps)
            for k, v in zip(names, totals, strict=True):
                sums[k] += v
            sums["tokens"] += loss_normalizer([part.mask], "token-mean", self._dp_sum)
            sums["ptx_tokens"] += ptx_norm if ptx_mbs else 0.0
        return self._actor_record(sums, grad_norms)

    def _actor_record(self, sums: dict, grad_norms: list[float]) -> dict:
        """The actor metrics of a step's updates (zeros when none ran)."""
        tok = max(sums["tokens"], 1.0)
        rec = {
            "policy_loss": sums["pg"] / tok,
            "clipfrac": sums["clip"] / tok,
            "approx_kl": sums["akl"] / tok,
            "ptx_loss": sums["ptx"] / sums["ptx_tokens"] if sums["ptx_tokens"] else 0.0,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "lr": self.actor.current_lr(),
        }
        if self.algo.dual_clip_c > 0:
            rec["dual_clipfrac"] = sums["dual"] / tok
        return rec

    def update_critic(self, exp: Experience) -> dict:
        """The critic's optimizer steps over the experience (none without a critic)."""
        if self.critic is None:
            return {"value_loss": 0.0}
        vl = tokens = 0.0
        for part in self.minibatches(exp):
            weights = token_weights(part.mask, self.algo.loss_agg)
            per_token = {"values": part.values, "returns": part.returns, "weights": weights,
                         "mask": part.mask}  # fmt: skip
            mbs = micro_batches(part, self.batching, self.ps, per_token)
            self.critic.begin_step(len(mbs))
            st = self._run(self.critic, mbs, self._value_loss_fn(self.normalizer(part)))
            self.critic.step()
            (s,) = sum_over_replicas([sum(x["vl"] for x in st)], self.ps)
            vl += s
            tokens += loss_normalizer([part.mask], "token-mean", self._dp_sum)
        return {"value_loss": vl / max(tokens, 1.0)}

    def _dp_sum(self, values: list[float]) -> list[float]:
        return sum_over_dp(values, self.ps)

    def ptx_micro_batches(self) -> tuple[list[dict], float]:
        """This DP rank's micro-batches of the next PTX batch (dense rows, the token budget's
        worth each), and the batch's next-token count (all ranks); ([], 1.0) without PTX."""
        if self.ptx_rows is None:
            return [], 1.0
        rows = self.ptx_rows[next_global_batch(self.ptx_sampler)]
        lo, hi = slice_bounds(rows.shape[0], self.ps.dp_rank, self.ps.dp_size)
        mine, length = rows[lo:hi], rows.shape[1]
        size = max(self.batching.budget(length) // length, 1)
        dev = self.batching.device
        mbs = [{"input_ids": mine[s : s + size].to(dev)} for s in range(0, mine.shape[0], size)]
        return mbs, float(self.algo.ptx_batch_size * (length - 1))

    def _run(self, model: DeepSpeedModel, mbs: list[dict], loss_fn) -> list[dict]:
        return self.fwd_bwd(
            model=model, micro_batches=mbs, loss_fn=loss_fn, ps=self.ps,
            backward_fn=model.backward,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- losses

    def _policy_loss_fn(self, normalizer: float):
        a = self.algo
        policy_loss = POLICY_LOSSES[a.policy_loss]
        with_entropy = a.entropy_coef > 0

        def loss_fn(out: torch.Tensor, mb: dict):
            pk = mb["packed"]
            lp = packed_logprobs(out, mb, self.ps, self.temperature, entropy=with_entropy)
            logp, ent = lp if with_entropy else (lp, None)
            pg, st = policy_loss(
                logp, pk["old_logprobs"], pk["advantages"], a.clip_eps, a.dual_clip_c
            )
            if "is_weights" in pk:  # ppo.rollout_is: the policy term only, not the entropy
                pg = pg * pk["is_weights"]
            total = pg + entropy_bonus(ent, a.entropy_coef) if with_entropy else pg
            loss = aggregate(total, pk["weights"], normalizer)
            m = pk["mask"]
            dual = st.get("dual_clipped")
            return loss, {
                "pg": float((pg.detach() * m).sum()),
                "clip": float((st["clipped"] * m).sum()),
                "akl": float((st["approx_kl"] * m).sum()),
                "dual": float((dual * m).sum()) if dual is not None else 0.0,
            }

        return loss_fn

    def _ptx_loss_fn(self, normalizer: float):
        coef = self.algo.ptx_coef

        def loss_fn(out: torch.Tensor, mb: dict):
            ids = mb["input_ids"]
            logp = logprobs_from_logits(out[:, :-1], ids[:, 1:], tp_group=self.ps.tp_group)
            return ptx_loss(logp, coef, normalizer), {"ptx": float(-logp.detach().sum())}

        return loss_fn

    def _value_loss_fn(self, normalizer: float):
        a = self.algo

        def loss_fn(out: torch.Tensor, mb: dict):
            pk = mb["packed"]
            v = scalar_output(out, mb)
            per_token, _ = clipped_value_loss(v, pk["values"], pk["returns"], a.value_clip)
            loss = aggregate(per_token, pk["weights"], normalizer)
            return loss, {"vl": float((per_token.detach() * pk["mask"]).sum())}

        return loss_fn

    # ----------------------------------------------------------------------------- loop parts

    def count(self, rec: dict) -> dict:
        self.counters.samples += self.rollout_cfg.rollout_batch_size * self.group_size
        self.counters.response_tokens += int(rec["response_tokens"])
        return {}

    def progress_fields(self, rec: dict) -> dict:
        return {"reward": f"{rec['reward_mean']:+.3f}", "kl": f"{rec['kl']:.3f}"}

    def summary(self, step: int, rec: dict) -> str:
        return (
            f"step {step}/{self.total_steps} reward {rec['reward_mean']:+.3f}"
            f"±{rec['reward_std']:.3f} kl {rec['kl']:.4f} beta {rec['kl_coef']:.4f} "
            f"pg {rec['policy_loss']:+.4f} vf {rec['value_loss']:.4f} clip {rec['clipfrac']:.3f} "
            f"len {rec['response_length']:.1f} mismatch {rec['logprob_mismatch']:.2e} "
            f"gen {rec['time_generate']:.2f}s reshard {rec['time_reshard']:.3f}s "
            f"step {rec['step_time_s']:.2f}s"
        )
