"""The PPO stage (InstructGPT's third): four models composed, a hybrid-engine rollout, PPO-ptx.

Roles, each a separate object:
  actor      GPTModel (lm head) in the training layout, trained by its own `TrainEngine`;
  reference  frozen copy of the SFT weights, training layout, eval mode, no optimizer;
  critic     GPTModel (scalar head) initialized from the reward model, its own `TrainEngine`;
  reward     frozen, bias-normalized scalar-head model (or a `reward_fn` hook for toy rewards);
  rollout    `HybridEngine`: re-shards the actor into the generation layout, generates, releases.

One PPO step (every rank):
  1. rollout of `ppo.rollout_batch_size` prompts; each rank keeps its training-DP slice;
  2. forward-only passes in the training layout (pipeline schedule; the last stage's outputs are
     broadcast over the pipeline): actor log-probs (recomputed; `logprob_mismatch` = max |gen -
     recomputed| is logged; `ppo.recompute_old_logprobs=false` keeps generation's instead),
     reference log-probs, values, the RM score at the last response token;
  3. `token_rewards` (-beta KL per token + score at the last token), `gae`, whitened advantages
     (over the whole rollout batch: statistics are all-reduced over DP);
  4. `ppo.ppo_epochs` x `ppo.num_minibatches` optimizer steps of the clipped surrogate (plus the
     entropy bonus and, in the SAME step, `ptx_coef` x the next-token loss on PTX rows) for the
     actor, and of the clipped value loss for the critic.

Losses are sums over tokens divided by the global token count of the minibatch, so gradients are
the same at any DP size / micro-batch split (TrainEngine sums over micro-batches and DP).
Log-prob semantics: `logprobs_from_logits(..., temperature=T)` with the sampling temperature T
(1 when sampling greedily), before top-k / top-p, exactly what generation reports.

Checkpoints (`ppo_checkpoint`) hold actor and critic with their optimizers and schedulers, the
data positions, the KL controller and every RNG; a run resumes exactly (checkpoint.resume=auto).
`ppo.advantage_estimator=rloo|grpo` drops the critic: K = ppo.samples_per_prompt answers per
prompt, group baselines (`megarlhf.algos.group_baseline`) instead of GAE, the same actor update.
`ppo.ema_decay` > 0 keeps an fp32 moving average of the actor (checkpointed under ema/).
Not done yet (docs/ppo.md): offloading frozen models to CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megarlhf.algos.group_baseline import group_advantages
from megarlhf.algos.kl_controller import KLController
from megarlhf.algos.ppo import policy_loss, token_rewards, value_loss
from megarlhf.algos.ranking import last_token_scores
from megarlhf.algos.stats import whiten_with_moments
from megarlhf.checkpoint.model_shards import read_meta
from megarlhf.checkpoint.rng import load_rng_state
from megarlhf.config import ConfigError
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.engine.hybrid import HybridEngine, Sample, slice_bounds
from megarlhf.engine.offload import FrozenModel
from megarlhf.kernels import gae, logprobs_from_logits
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.scalars import (
    broadcast_object,
    from_last_stage,
    sum_over_dp,
    sum_over_replicas,
    world_max,
)
from megarlhf.parallel.state import ParallelState, build_parallel_state
from megarlhf.trainers import checkpointing as ckpt
from megarlhf.trainers.ema import EMA
from megarlhf.trainers.engine import TrainEngine
from megarlhf.trainers.init_from import load_init_weights
from megarlhf.trainers.loop import TrainerHooks, seed_everything
from megarlhf.trainers.ppo_checkpoint import load_ppo_checkpoint, save_ppo_checkpoint
from megarlhf.trainers.ppo_config import PPORunConfig, engine_config
from megarlhf.trainers.ppo_data import EpochSampler, load_prompts, load_ptx_rows
from megarlhf.utils.progress import Progress

logger = logging.getLogger(__name__)

# reward_fn(prompts, responses) -> one float per sample: replaces the reward model (toy rewards).
RewardFn = Callable[[list[list[int]], list[list[int]]], list[float]]
IGNORE = -100


def collate_rollout(samples: list[Sample], width: int, n: int, pad_id: int) -> dict:
    """Training tensors of samples: prompt left-padded to `width`, response right-padded to `n`.

    Returns:
        input_ids / attention_mask [b, width + n]; labels [b, n] (response ids, IGNORE after
        the response); mask [b, n] fp32; gen_logprobs [b, n] fp32 (0 outside the mask).
    """
    b = len(samples)
    ids = torch.full((b, width + n), pad_id, dtype=torch.long)
    attn = torch.zeros(b, width + n, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    gen_lp = torch.zeros(b, n, dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt), len(s.response)
        ids[i, width - p : width] = torch.tensor(s.prompt)
        attn[i, width - p : width + r] = 1
        if r:
            ids[i, width : width + r] = torch.tensor(s.response)
            labels[i, :r] = torch.tensor(s.response)
            gen_lp[i, :r] = torch.tensor(s.logprobs)
    mask = (labels != IGNORE).float()
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels,
        "mask": mask,
        "gen_logprobs": gen_lp,
    }


def split_rows(batch: dict, rows: range, size: int) -> list[dict]:
    """Micro-batches of `size` rows (the last may be smaller) of the rows `rows` of `batch`."""
    out = []
    for s in range(rows.start, rows.stop, size):
        e = min(s + size, rows.stop)
        out.append({k: v[s:e] for k, v in batch.items()})
    return out


class PPOTrainer:
    """PPO training of one run (one output directory); see the module docstring.

    Args:
        cfg: the run config.
        ps: this rank's training layout (process groups already built).
        output_dir: metrics, TensorBoard files, config, final checkpoints.
        hooks: optional callbacks (`on_step_end(step)`).
        reward_fn: optional rule reward replacing the reward model.
        prompts: optional in-memory prompt token ids replacing data.prompt_files (benchmarks:
            synthetic prompts, no data files).
        stop_at_eos: False makes every response exactly generation.max_new_tokens long (the
            benchmark's fixed work per step); True stops a row at the tokenizer's EOS.
    """

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
        self.cfg, self.ps = cfg, ps
        self.given_prompts, self.stop_at_eos = prompts, stop_at_eos
        self.output_dir = Path(output_dir)
        self.hooks = hooks or TrainerHooks()
        self.reward_fn = reward_fn
        self.is_rank0 = ps.rank == 0

    # ----------------------------------------------------------------------------- set-up

    def _check_batch(self) -> None:
        p, dp = self.cfg.ppo, self.ps.dp_size
        if p.rollout_batch_size * p.samples_per_prompt % (dp * p.num_minibatches):
            raise ConfigError(
                f"ppo.rollout_batch_size: {p.rollout_batch_size} prompts x "
                f"ppo.samples_per_prompt {p.samples_per_prompt} is not a multiple of training "
                f"dp * ppo.num_minibatches = {dp} * {p.num_minibatches}"
            )
        if p.ptx_coef > 0 and p.ptx_batch_size % dp:
            raise ConfigError(
                f"ppo.ptx_batch_size: {p.ptx_batch_size} is not a multiple of dp={dp}"
            )
        gen_tp = p.generation_tp or self.ps.tp_size * self.ps.pp_size
        if self.ps.world_size % gen_tp:
            raise ConfigError(
                f"ppo.generation_tp: {gen_tp} does not divide the world size {self.ps.world_size}"
            )
        return gen_tp

    def _load(self, model: GPTModel, path: str, what: str) -> None:
        if path:
            load_init_weights(model, path, self.ps)
        else:
            logger.warning("%s: no checkpoint given, random initialization (tests / demos)", what)

    def setup(self) -> None:
        """Data, the four models, both engines, the hybrid engine. Errors come before any work."""
        cfg, ps, p = self.cfg, self.ps, self.cfg.ppo
        gen_tp = self._check_batch()
        seed_everything(p.seed, ps)
        self.tokenizer = tok = load_tokenizer(cfg.data.tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{tok.vocab_size} ids ({cfg.data.tokenizer})"
            )
        d = cfg.data
        if self.given_prompts is not None:
            self.prompts = [list(x) for x in self.given_prompts]
        else:
            self.prompts = load_prompts(d.prompt_files, tok, d.template, d.max_prompt_len)
        self.sampler = EpochSampler(len(self.prompts), p.rollout_batch_size, d.seed)
        self.ptx_rows = None
        if p.ptx_coef > 0:
            self.ptx_rows = load_ptx_rows(d.ptx_files, tok, d.ptx_seq_len)
            self.ptx_sampler = EpochSampler(len(self.ptx_rows), p.ptx_batch_size, d.seed + 1)
        rm_path = p.reward_model
        if rm_path and read_meta(rm_path).model.head != "scalar":
            raise ConfigError(f"ppo.reward_model: {rm_path} is not a scalar-head (reward) model")

        self.ckpt_root = self.output_dir / ckpt.CHECKPOINTS_DIR
        resume = broadcast_object(
            ckpt.find_resume_checkpoint(self.ckpt_root, cfg.checkpoint.resume)
            if self.is_rank0
            else None,
            self.ps,
        )
        if resume is not None:
            ckpt.check_resume_layout(resume, ps, cfg.deepspeed.zero_stage)
        self.resumed_from = resume
        init = cfg.checkpoint.init_from
        actor = GPTModel(cfg.model, ps, seed=p.seed)
        if resume is None:
            self._load(actor, init, "actor (checkpoint.init_from)")
        reference = GPTModel(cfg.model, ps, seed=p.seed)
        self._load(reference, init, "reference (checkpoint.init_from)")
        critic = None
        if p.advantage_estimator == "gae":
            critic = GPTModel(cfg.critic_model(), ps, seed=p.seed + 1)
            if resume is None:
                what = "critic (ppo.critic_init / ppo.reward_model)"
                self._load(critic, p.critic_init or rm_path, what)
        reward_model = None
        if self.reward_fn is None:
            reward_model = GPTModel(cfg.critic_model(), ps, seed=p.seed + 1)
            self._load(reward_model, rm_path, "reward model (ppo.reward_model)")
        updates = p.max_steps * p.ppo_epochs * p.num_minibatches
        self.actor = TrainEngine(actor, engine_config(cfg, "actor"), ps, updates)
        self.critic = None  # critic-free (rloo / grpo)
        if critic is not None:
            self.critic = TrainEngine(critic, engine_config(cfg, "critic"), ps, updates)
        # Frozen models run where the actor runs; optionally parked in CPU memory between uses.
        device = next(self.actor.module.parameters()).device
        self.reference = FrozenModel(reference, device, p.offload_frozen)
        self.reward_model = None
        if reward_model is not None:
            self.reward_model = FrozenModel(reward_model, device, p.offload_frozen)
        self.gen_ps = build_parallel_state(tp=gen_tp, pp=1)
        eos = tok.eos_id if self.stop_at_eos else None
        self.hybrid = HybridEngine(self.actor.module, self.gen_ps, cfg.generation, eos, tok.pad_id)
        self.kl_ctl = KLController(p.kl_coef, p.kl_target or None, p.kl_horizon)
        self.fwd_bwd = get_forward_backward_func(ps, p.pipeline_schedule)
        self.temperature = cfg.generation.temperature or 1.0
        self.step = 0
        self.ema = EMA(self.actor.module, p.ema_decay) if p.ema_decay > 0 else None
        if resume is not None:
            state = load_ppo_checkpoint(resume, actor=self.actor, critic=self.critic, ps=ps)
            self.load_state_dict(state)
            logger.info("resumed from %s at step %d", resume, self.step)

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Loop state saved with every checkpoint (models and optimizers go separately)."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_rows is not None else None,
            "kl_ctl": self.kl_ctl.state_dict(),
            "ema": self.ema.shadow if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ptx_rows is not None and state["ptx_sampler"] is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("ppo.ema_decay: > 0, but the checkpoint has no EMA to resume")
            self.ema.load_state_dict(state["ema"])

    def trackers(self) -> dict:
        out = {"actor_tp": self.actor.module.rng}
        if self.critic is not None:
            out["critic_tp"] = self.critic.module.rng
        return out

    def save(self) -> Path:
        return save_ppo_checkpoint(
            self.ckpt_root,
            step=self.step,
            actor=self.actor,
            critic=self.critic,
            ps=self.ps,
            state=self.state_dict(),
            trackers=self.trackers(),
            run_config=self.cfg,
            keep_last=self.cfg.checkpoint.keep_last,
            extra_models={"ema": self.ema.state_dict()} if self.ema is not None else None,
        )

    # ----------------------------------------------------------------------------- inference

    def _infer(self, model, mbs: list[dict], fn, shape) -> torch.Tensor:
        """Forward-only pass; fn(out, mb) -> [mb rows, ...] per micro-batch; concatenated on
        every stage."""
        stats = self.fwd_bwd(
            model=model,
            micro_batches=mbs,
            loss_fn=lambda out, mb: (None, {"x": fn(out, mb)}),
            ps=self.ps,
            forward_only=True,
        )
        t = torch.cat([s["x"] for s in stats]) if stats else None
        return from_last_stage(t, shape, self.ps)

    def _logprobs(self, out: torch.Tensor, mb: dict, entropy: bool = False):
        n = mb["labels"].shape[1]
        w = mb["input_ids"].shape[1] - n
        return logprobs_from_logits(
            out[:, w - 1 : w + n - 1],
            mb["labels"],
            tp_group=self.ps.tp_group,
            temperature=self.temperature,
            return_entropy=entropy,
            ignore_index=IGNORE,
        )

    @staticmethod
    def _values(out: torch.Tensor, mb: dict) -> torch.Tensor:
        """Critic value of the state before each response token, fp32 [mb, n]."""
        n = mb["labels"].shape[1]
        w = mb["input_ids"].shape[1] - n
        return out[:, w - 1 : w + n - 1, 0].float() * mb["mask"]

    @torch.no_grad()
    def make_experience(self, batch: dict, samples: list[Sample]) -> tuple[dict, dict]:
        """Old / reference log-probs, values, scores, rewards, advantages, returns of `batch`."""
        p = self.cfg.ppo
        mbs = split_rows(batch, range(batch["mask"].shape[0]), p.micro_batch_size)
        b, n = batch["mask"].shape
        times = {}
        t0 = time.perf_counter()
        if p.recompute_old_logprobs:
            self.actor.train(False)
            both = self._infer(
                self.actor,
                mbs,
                lambda out, mb: torch.stack(self._logprobs(out, mb, entropy=True), -1),
                (b, n, 2),
            )
            self.actor.train(True)
            old, entropy = both[..., 0], both[..., 1]
        else:
            old, entropy = batch["gen_logprobs"], -batch["gen_logprobs"]
        t1 = time.perf_counter()
        with self.reference.use() as reference:
            ref = self._infer(reference, mbs, lambda out, mb: self._logprobs(out, mb), (b, n))
        t2 = time.perf_counter()
        # time_reference keeps its meaning (both passes); the split is for the benchmark.
        times["time_actor_forward"], times["time_reference_forward"] = t1 - t0, t2 - t1
        times["time_reference"] = t2 - t0
        t0 = time.perf_counter()
        values = torch.zeros(b, n)
        if self.critic is not None:
            self.critic.train(False)
            values = self._infer(self.critic, mbs, self._values, (b, n))
            self.critic.train(True)
        times["time_values"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.reward_fn is not None:
            scores = torch.tensor(
                self.reward_fn([s.prompt for s in samples], [s.response for s in samples]),
                dtype=torch.float32,
            )
        else:
            with self.reward_model.use() as reward_model:
                scores = self._infer(
                    reward_model,
                    mbs,
                    lambda out, mb: last_token_scores(out[..., 0], mb["attention_mask"]).float(),
                    (b,),
                )
        times["time_reward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask = batch["mask"]
        rm_scores = scores
        if p.whiten_rewards:
            s = scores.double()
            rm_scores = whiten_with_moments(
                scores,
                *sum_over_dp([float(s.sum()), float((s * s).sum()), float(s.numel())], self.ps),
            ).float()
        rewards, kl, non_score = token_rewards(
            rm_scores, old, ref, mask, self.kl_ctl.beta, p.kl_estimator, p.score_clip
        )
        if self.critic is not None:
            adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
        else:
            adv, returns = self._group_advantages(rewards.sum(-1))[:, None] * mask, values
        if p.whiten_advantages:
            adv = self._whiten(adv, mask)
        times["time_advantages"] = time.perf_counter() - t0
        exp = {**batch, "old_logprobs": old, "ref_logprobs": ref, "values": values}
        exp.update(advantages=adv, returns=returns)
        mismatch = ((batch["gen_logprobs"] - old).abs() * mask).max() if mask.any() else 0.0
        stats = self._rollout_stats(scores, kl, non_score, entropy, values, returns, mask)
        stats["logprob_mismatch"] = world_max(float(mismatch), self.ps)
        if self.critic is None:
            stats["explained_variance"] = 0.0  # no critic
        return exp, {**stats, **times}

    def _group_advantages(self, seq_rewards: torch.Tensor) -> torch.Tensor:
        """RLOO / GRPO advantages [b] of this DP slice; groups may span DP ranks, so the sequence
        rewards of the whole rollout batch are all-gathered over DP first (equal slices)."""
        p, ps = self.cfg.ppo, self.ps
        full = seq_rewards.float().contiguous()
        if ps.dp_group is not None:
            parts = [torch.empty_like(full) for _ in range(ps.dp_size)]
            dist.all_gather(parts, full, group=ps.dp_group)
            full = torch.cat(parts)
        adv = group_advantages(full, p.samples_per_prompt, p.advantage_estimator)
        b = seq_rewards.shape[0]
        return adv[ps.dp_rank * b : (ps.dp_rank + 1) * b]

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std over the masked tokens of the whole rollout batch (all DP ranks)."""
        moments = sum_over_dp(
            [float((x * mask).sum()), float((x * x * mask).sum()), float(mask.sum())], self.ps
        )
        return whiten_with_moments(x, *moments) * mask

    def _rollout_stats(self, scores, kl, non_score, entropy, values, returns, mask) -> dict:
        r = scores.double()
        err = (returns - values) * mask
        sums = sum_over_dp(
            [
                float(r.sum()),
                float((r * r).sum()),
                float(r.numel()),
                float(kl.sum()),
                float(non_score.sum()),
                float((entropy * mask).sum()),
                float(mask.sum()),
                float((returns * mask).sum()),
                float((returns * returns * mask).sum()),
                float(err.sum()),
                float((err * err).sum()),
            ],
            self.ps,
        )
        rs, rsq, rows, kls, nss, ents, toks, ret, ret2, e, e2 = sums
        mean = rs / rows
        var_ret = ret2 / max(toks, 1) - (ret / max(toks, 1)) ** 2
        var_err = e2 / max(toks, 1) - (e / max(toks, 1)) ** 2
        return {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(rsq / rows - mean * mean, 0.0)),
            "kl": kls / rows,
            "non_score_reward": nss / rows,
            "entropy": ents / max(toks, 1),
            "explained_variance": 1.0 - var_err / max(var_ret, 1e-12),
            "response_length": toks / rows,
            "response_tokens": toks,
        }

    # ----------------------------------------------------------------------------- updates

    def _actor_loss_fn(self, tokens: float, ptx_tokens: float):
        p = self.cfg.ppo

        def loss_fn(out: torch.Tensor, mb: dict):
            if mb.get("ptx") is not None:
                ids = mb["input_ids"]
                logp = logprobs_from_logits(out[:, :-1], ids[:, 1:], tp_group=self.ps.tp_group)
                nll = -logp.sum()
                return p.ptx_coef * nll / ptx_tokens, {"ptx_sum": float(nll.detach())}
            logp, ent = self._logprobs(out, mb, entropy=True)
            mask = mb["mask"]
            k = float(mask.sum())
            pg, st = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, p.clip_eps)
            loss = pg * (k / tokens)
            if p.entropy_coef > 0:
                loss = loss - p.entropy_coef * (ent * mask).sum() / tokens
            return loss, {
                "pg_sum": float(pg.detach()) * k,
                "clip_sum": float(st["clipfrac"]) * k,
                "akl_sum": float(st["approx_kl"]) * k,
            }

        return loss_fn

    def _critic_loss_fn(self, tokens: float):
        clip = self.cfg.ppo.value_clip

        def loss_fn(out: torch.Tensor, mb: dict):
            mask = mb["mask"]
            k = float(mask.sum())
            v = self._values(out, mb)
            loss, _ = value_loss(v, mb["values"], mb["returns"], mask, clip)
            return loss * (k / tokens), {"vl_sum": float(loss.detach()) * k}

        return loss_fn

    def _ptx_micro_batches(self) -> list[dict]:
        rows = self.ptx_rows[self.ptx_sampler.next_batch()]
        lo, hi = slice_bounds(rows.shape[0], self.ps.dp_rank, self.ps.dp_size)
        mine = {"input_ids": rows[lo:hi], "ptx": torch.ones(hi - lo)}
        return split_rows(mine, range(hi - lo), self.cfg.ppo.micro_batch_size)

    def update(self, exp: dict) -> dict:
        """ppo_epochs x num_minibatches optimizer steps of actor and critic; averaged stats."""
        p = self.cfg.ppo
        b = exp["mask"].shape[0]
        per = b // p.num_minibatches
        keys = ("old_logprobs", "advantages", "mask", "labels", "values", "returns")
        train = {k: exp[k] for k in ("input_ids", "attention_mask", *keys)}
        acc = dict.fromkeys(("pg", "clip", "akl", "vl", "ptx", "tok", "ptx_tok"), 0.0)
        t_actor = t_critic = 0.0
        grad_norms = []
        for _ in range(p.ppo_epochs):
            for m in range(p.num_minibatches):
                mbs = split_rows(train, range(m * per, (m + 1) * per), p.micro_batch_size)
                (tokens,) = sum_over_dp(
                    [float(exp["mask"][m * per : (m + 1) * per].sum())], self.ps
                )
                tokens = max(tokens, 1.0)
                t0 = time.perf_counter()
                all_mbs = mbs
                ptx_tokens = 1.0
                if self.ptx_rows is not None:
                    all_mbs = mbs + self._ptx_micro_batches()
                    ptx_tokens = p.ptx_batch_size * (self.ptx_rows.shape[1] - 1)
                self.actor.begin_step(len(all_mbs))
                st = self.fwd_bwd(
                    model=self.actor,
                    micro_batches=all_mbs,
                    loss_fn=self._actor_loss_fn(tokens, ptx_tokens),
                    ps=self.ps,
                    backward_fn=self.actor.backward,
                )
                grad_norms.append(self.actor.step()["grad_norm"])
                if self.ema is not None:
                    self.ema.update()
                t_actor += time.perf_counter() - t0
                t0 = time.perf_counter()
                cst = []
                if self.critic is not None:
                    self.critic.begin_step(len(mbs))
                    cst = self.fwd_bwd(
                        model=self.critic,
                        micro_batches=mbs,
                        loss_fn=self._critic_loss_fn(tokens),
                        ps=self.ps,
                        backward_fn=self.critic.backward,
                    )
                    self.critic.step()
                t_critic += time.perf_counter() - t0
                sums = sum_over_replicas(
                    [
                        sum(s.get("pg_sum", 0.0) for s in st),
                        sum(s.get("clip_sum", 0.0) for s in st),
                        sum(s.get("akl_sum", 0.0) for s in st),
                        sum(s["vl_sum"] for s in cst),
                        sum(s.get("ptx_sum", 0.0) for s in st),
                    ],
                    self.ps,
                )
                for k, v in zip(("pg", "clip", "akl", "vl", "ptx"), sums, strict=True):
                    acc[k] += v
                acc["tok"] += tokens
                acc["ptx_tok"] += ptx_tokens if self.ptx_rows is not None else 0.0
        tok = max(acc["tok"], 1.0)
        return {
            "policy_loss": acc["pg"] / tok,
            "clipfrac": acc["clip"] / tok,
            "approx_kl": acc["akl"] / tok,
            "value_loss": acc["vl"] / tok,
            "ptx_loss": acc["ptx"] / acc["ptx_tok"] if acc["ptx_tok"] else 0.0,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.actor.current_lr(),
            "time_update_actor": t_actor,
            "time_update_critic": t_critic,
        }

    # ----------------------------------------------------------------------------- the loop

    def train_step(self) -> dict:
        """One PPO step: rollout, experience, updates; returns the step's metrics."""
        cfg, ps = self.cfg, self.ps
        t_start = time.perf_counter()
        k = cfg.ppo.samples_per_prompt
        prompts = [self.prompts[i] for i in self.sampler.next_batch() for _ in range(k)]
        samples = self.hybrid.rollout(prompts, self.step)
        timings = dict(self.hybrid.timings)
        width = max(len(s.prompt) for s in samples)
        lo, hi = slice_bounds(len(samples), ps.dp_rank, ps.dp_size)
        mine = samples[lo:hi]
        batch = collate_rollout(mine, width, cfg.generation.max_new_tokens, self.tokenizer.pad_id)
        beta = self.kl_ctl.beta
        exp, rec = self.make_experience(batch, mine)
        rec.update(self.update(exp))
        self.kl_ctl.update(rec["kl"], len(samples))
        dt = time.perf_counter() - t_start
        rec.update(timings)
        rec.update(kl_coef=beta, step_time_s=dt, tokens_per_s=rec["response_tokens"] / dt)
        return rec

    def train(self) -> dict:
        """Run ppo.max_steps PPO steps; returns the last record."""
        if not hasattr(self, "actor"):
            self.setup()
        cfg, p = self.cfg, self.cfg.ppo
        metrics = None
        if self.is_rank0:
            resume_step = self.step if self.resumed_from is not None else -1
            metrics = ckpt.open_run_dir(self.output_dir, cfg, resume_step, cfg.logging.tensorboard)
        bar = self.is_rank0 and cfg.logging.progress_bar
        progress = Progress(p.max_steps, self.step, enabled=bar)
        if self.resumed_from is not None:  # last, so nothing in between draws from them
            load_rng_state(self.resumed_from, self.ps.rank, self.trackers())
        last: dict = {"step": self.step}
        saved_at = self.step if self.resumed_from is not None else -1
        while self.step < p.max_steps:
            rec = self.train_step()
            self.step += 1
            last = {"step": self.step, **rec}
            if metrics is not None:
                metrics.log(self.step, rec)
            progress.update({"reward": f"{rec['reward_mean']:+.3f}", "kl": f"{rec['kl']:.3f}"})
            every = cfg.logging.log_every
            if self.is_rank0 and every and (self.step % every == 0 or self.step == p.max_steps):
                progress.write(self.summary(rec))
            every = cfg.checkpoint.save_every
            final = self.step == p.max_steps
            if (every and self.step % every == 0) or (final and cfg.checkpoint.save_final):
                last["checkpoint"] = str(self.save())
                saved_at = self.step
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(self.step)
        if cfg.checkpoint.save_final and saved_at != self.step:
            last["checkpoint"] = str(self.save())
        progress.close()
        if metrics is not None:
            metrics.close()
        return last

    def summary(self, rec: dict) -> str:
        return (
            f"step {self.step}/{self.cfg.ppo.max_steps} reward {rec['reward_mean']:+.3f}"
            f"±{rec['reward_std']:.3f} kl {rec['kl']:.4f} beta {rec['kl_coef']:.4f} "
            f"pg {rec['policy_loss']:+.4f} vf {rec['value_loss']:.4f} clip {rec['clipfrac']:.3f} "
            f"len {rec['response_length']:.1f} mismatch {rec['logprob_mismatch']:.2e} "
            f"gen {rec['time_generate']:.2f}s reshard {rec['time_reshard']:.3f}s "
            f"step {rec['step_time_s']:.2f}s"
        )
