"""Reward-model training: the second InstructGPT stage, as one trainer object.

A micro-batch holds whole prompts: all K completions of each prompt are forwarded once (one row
each, right-padded), the last stage reads each completion's reward at its last real token (the
EOS after the response), and every within-prompt pair is formed afterwards by
`algos.ranking.kway_ranking_loss`. A prompt's loss is the mean over its C(K, 2) pairs of
-log sigmoid(r_w - r_l); it is never split over micro-batches or ranks, so the completions of one
prompt never appear in two batch elements (InstructGPT's fix for reward-model overfitting).

Loss normalization: each micro-batch contributes (sum of its prompts' losses) / P, where P is the
number of prompts in the *global* batch (all micro-batches of all DP ranks), and the engine sums
gradients; so the step's loss is the mean over the global batch's prompts whatever the micro-batch
size, accumulation steps, DP size, or the K of each prompt. TP: the scalar head reduces its
partial scores over the TP group and every TP rank computes the same loss. PP: the rewards come out
of the last stage; earlier stages back-propagate the gradient they receive.

Metrics per step: loss (that global prompt mean), accuracy (fraction of all pairs ordered
correctly), margin (mean r_w - r_l over pairs), reward_mean / reward_std (over all completions of
the global batch), lr, grad_norm, tokens_per_s; eval_loss / eval_accuracy / eval_margin on the
held-out files.

Reward normalization (InstructGPT): after the last step, before the final checkpoint, the mean
reward over a set of demonstrations (prompt + labeler-written response, scored at its last token,
the EOS, exactly as ranking completions are) is subtracted from `head.bias`. The ranking loss
depends only on reward differences, so it leaves the offset arbitrary; PPO, which adds the reward
to a KL penalty, wants it anchored. The bias is part of the model, so every later use of the
checkpoint (inference, the PPO critic's initialization) sees the normalized reward. Every rank
ends with the same shift (the mean is summed over DP replicas on the last stage and all-reduced
over the world), and under ZeRO the optimizer's fp32 master copy moves too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarlhf.algos.ranking import kway_ranking_loss, last_token_scores
from megarlhf.config.rm import RMRunConfig
from megarlhf.data.chat import through_last_trained
from megarlhf.data.ranking_loader import RankingLoader, ranking_eval_batches, sequence_batches
from megarlhf.data.rankings import load_ranking_dataset
from megarlhf.data.sampler import ResumableSampler
from megarlhf.data.sft import load_sft_dataset
from megarlhf.data.tokenizer import Tokenizer
from megarlhf.optim.deepspeed_model import add_to_parameter
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.scalars import sum_over_dp, sum_over_replicas
from megarlhf.parallel.state import ParallelState
from megarlhf.trainers.loop import SingleModelTrainer

logger = logging.getLogger(__name__)

# Sums a step / an evaluation accumulates per micro-batch, in this order.
_SUMS = ("loss_sum", "prompts", "pairs", "correct", "margin_sum", "reward_sum", "reward_sq", "n")


@dataclass
class RMCounters:
    """Progress counters saved with every checkpoint."""

    # Optimizer steps completed.
    step: int = 0
    # Non-padding tokens consumed (all completions, all DP ranks).
    tokens: int = 0
    # Prompts consumed (global).
    prompts: int = 0
    # Within-prompt pairs trained on (global).
    pairs: int = 0
    # Total subtracted from head.bias by reward normalization (0 until the end of training).
    reward_offset: float = 0.0


def completion_rewards(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each completion: head output 0 at its last real token, fp32 [n] from [n, s, k]."""
    return last_token_scores(scores[..., 0], attention_mask).float()


def make_rm_loss_fn(num_prompts: float):
    """loss_fn(scores, micro_batch) -> (loss, stats) for the forward-backward schedule.

    Args:
        num_prompts: prompts in the whole global batch (the normalizer).
    Returns:
        a function giving loss = sum over this micro-batch's prompts of their mean pair loss,
        divided by num_prompts, and stats with the sums of `_SUMS` (detached) plus the rewards
        [sum K]. A micro-batch flagged `filler` (evaluation padding) counts nothing.
    """

    def loss_fn(scores: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        rewards = completion_rewards(scores, mb["attention_mask"])
        group_sizes = mb["group_sizes"].tolist()
        mean_loss, st = kway_ranking_loss(rewards, group_sizes, mb["ranks"])
        prompt_sum = mean_loss * len(group_sizes)
        r = rewards.detach().double()
        pairs = float(st["num_pairs"])
        sums = {
            "loss_sum": float(prompt_sum.detach()),
            "prompts": float(len(group_sizes)),
            "pairs": pairs,
            "correct": round(float(st["accuracy"]) * pairs),
            "margin_sum": float(st["margin"]) * pairs,
            "reward_sum": float(r.sum()),
            "reward_sq": float((r * r).sum()),
            "n": float(r.numel()),
        }
        if mb.get("filler"):
            sums = dict.fromkeys(sums, 0.0)
        return prompt_sum / num_prompts, {**sums, "rewards": rewards.detach()}

    return loss_fn


def _totals(stats: list[dict]) -> list[float]:
    return [sum(float(s[k]) for s in stats) for k in _SUMS]


def summarize(sums: list[float], prefix: str = "") -> dict:
    """Metrics of global sums in `_SUMS` order."""
    t = dict(zip(_SUMS, sums, strict=True))
    mean = t["reward_sum"] / max(t["n"], 1.0)
    var = max(t["reward_sq"] / max(t["n"], 1.0) - mean * mean, 0.0)
    out = {
        "loss": t["loss_sum"] / max(t["prompts"], 1.0),
        "accuracy": t["correct"] / max(t["pairs"], 1.0),
        "margin": t["margin_sum"] / max(t["pairs"], 1.0),
        "reward_mean": mean,
        "reward_std": math.sqrt(var),
        "prompts": int(t["prompts"]),
        "pairs": int(t["pairs"]),
    }
    return {prefix + k: v for k, v in out.items()}


class RMTrainer(SingleModelTrainer):
    """Reward-model training of one run (one output directory).

    Args:
        cfg: the run config (rm.grad_accum is derived per DP size from rm.global_batch_size).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    cfg: RMRunConfig
    counters_cls = RMCounters
    stage = "rm"

    @property
    def section(self):
        return self.cfg.rm

    # ----------------------------------------------------------------------------- data

    def build_data(self) -> None:
        cfg, ps, tok = self.cfg, self.ps, self.tokenizer
        d, r, mbs = cfg.data, cfg.rm, cfg.rm.loop.micro_batch_size
        train = load_ranking_dataset(
            d.train_files, tok, d.seq_len, d.text.template, d.max_k, d.skip_invalid, d.rows
        )
        sampler = ResumableSampler(
            len(train.samples), mbs, self.passes.grad_accum, ps.dp_rank, ps.dp_size, d.seed
        )
        self.loader = RankingLoader(train.samples, tok.pad_id, sampler)
        self.eval_batches = None
        if self.passes.eval_files:
            held_out = load_ranking_dataset(
                self.passes.eval_files, tok, d.seq_len, d.text.template, d.max_k, d.skip_invalid,
                d.rows,
            )  # fmt: skip
            self.eval_batches = ranking_eval_batches(
                held_out.samples, tok.pad_id, mbs, ps.dp_rank, ps.dp_size
            )
        self.norm_batches = None
        if r.normalize_files:
            self.norm_batches = demonstration_batches(
                r.normalize_files, tok, d.seq_len, d.text.template, r.normalize_micro_batch_size,
                ps, d.skip_invalid,
            )  # fmt: skip

    # ----------------------------------------------------------------------------- steps

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        ps = self.ps
        prompts, tokens = sum_over_dp(
            [
                sum(len(mb["group_sizes"]) for mb in micro_batches),
                sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
            ],
            ps,
        )
        stats, out = self.accumulate_and_step(micro_batches, make_rm_loss_fn(prompts))
        rec = summarize(sum_over_replicas(_totals(stats), ps))
        return {**rec, "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens": int(tokens)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, pair accuracy and margin over the held-out prompts (all DP ranks')."""
        self.model.train(False)
        stats = self.fwd_bwd(
            model=self.model,
            micro_batches=self.to_device(self.eval_batches),
            loss_fn=make_rm_loss_fn(1.0),
            ps=self.ps,
            forward_only=True,
        )
        self.model.train(True)
        rec = summarize(sum_over_replicas(_totals(stats), self.ps), prefix="eval_")
        keep = ("eval_loss", "eval_accuracy", "eval_margin", "eval_reward_mean", "eval_prompts")
        return {k: rec[k] for k in keep}

    def count(self, rec: dict) -> dict:
        c = self.counters
        c.tokens += rec["tokens"]
        c.prompts += rec["prompts"]
        c.pairs += rec["pairs"]
        return {"total_tokens": c.tokens}

    def on_train_end(self) -> dict:
        """Reward normalization on the demonstrations, before the final checkpoint."""
        if not self.norm_batches:
            return {}
        batches = self.to_device(self.norm_batches)
        schedule = self.cfg.rm.loop.pipeline_schedule
        mean = normalize_reward_bias(self.model, batches, self.ps, schedule)
        self.counters.reward_offset += mean
        return {"demo_reward_mean": mean, "reward_offset": self.counters.reward_offset}

    def summary(self, step: int, rec: dict) -> str:
        line = (
            f"step {step}/{self.total_steps} loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} "
            f"reward {rec['reward_mean']:+.3f}±{rec['reward_std']:.3f} lr {rec['lr']:.3e} "
            f"grad_norm {rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
        )
        if "eval_accuracy" in rec:
            line += f" eval_loss {rec['eval_loss']:.4f} eval_acc {rec['eval_accuracy']:.3f}"
        if "demo_reward_mean" in rec:
            line += f" normalized (demo mean {rec['demo_reward_mean']:+.4f} -> 0)"
        return line


# ----------------------------------------------------------------------------- normalization


def demonstration_batches(
    files: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str,
    micro_batch_size: int,
    ps: ParallelState,
    skip_invalid: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the demonstrations (SFT-format files), as sequences.

    Every DP rank gets the same number of micro-batches; a filler micro-batch carries
    `filler=True` and is not counted.
    """
    data = load_sft_dataset(files, tokenizer, seq_len, template, skip_invalid)
    seqs = [through_last_trained(s.input_ids, s.loss_mask) for s in data.samples]
    return sequence_batches(seqs, tokenizer.pad_id, micro_batch_size, ps.dp_rank, ps.dp_size)


def _score_fn(scores: torch.Tensor, mb: dict) -> tuple[None, dict]:
    """Forward-only loss_fn: each sequence's reward at its last token (output 0), fp32 [n]."""
    rewards = completion_rewards(scores, mb["attention_mask"])
    if mb.get("filler"):
        rewards = rewards[:0]
    return None, {"rewards": rewards}


@torch.no_grad()
def demonstration_reward_mean(
    model, batches: list[dict], ps: ParallelState, schedule: str = "1f1b"
) -> float:
    """Mean reward over the demonstrations of all DP ranks; the same float on every rank.

    Args:
        model: this rank's GPTModel stage (scalar head), or a wrapper exposing it as `.module`.
        batches: this DP rank's `demonstration_batches` (the same on every rank of the replica).
        ps: the layout.
        schedule: pipeline schedule.
    """
    was_training = _stage(model).training
    model.train(False)  # no dropout while scoring
    try:
        stats = get_forward_backward_func(ps, schedule)(
            model=model, micro_batches=batches, loss_fn=_score_fn, ps=ps, forward_only=True
        )
    finally:
        model.train(was_training)
    t = torch.zeros(2, dtype=torch.float64)
    if ps.is_last_stage and ps.tp_rank == 0:
        for s in stats:
            t[0] += s["rewards"].double().sum()
            t[1] += s["rewards"].numel()
    if ps.world_size > 1:
        dist.all_reduce(t)
    if t[1] == 0:
        raise ValueError("no demonstrations to normalize the reward over")
    return float(t[0] / t[1])


def _stage(model):
    return model.module if hasattr(model, "module") else model


def normalize_reward_bias(
    model, batches: list[dict], ps: ParallelState, schedule: str = "1f1b"
) -> float:
    """Make the mean reward over `batches` 0 by subtracting it from head.bias on every rank.

    Works on a plain GPTModel stage (standalone) or a DeepSpeedModel (inside training).
    Collective over the world.

    Returns:
        the mean reward before the shift (what was subtracted).
    """
    mean = demonstration_reward_mean(model, batches, ps, schedule)
    stage = _stage(model)
    if getattr(stage, "post_process", False):
        add_to_parameter(stage.head.bias, -mean)
    logger.info("reward normalization: demonstration mean %.6f subtracted from head.bias", mean)
    return mean
