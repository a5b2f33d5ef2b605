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
held-out files. After the last step the reward is normalized on the demonstration files
(`reward_norm.py`) before the final checkpoint is written.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megarlhf.algos.ranking import kway_ranking_loss, last_token_scores
from megarlhf.data.ranking_loader import RankingLoader
from megarlhf.data.rankings import collate_rankings, load_ranking_dataset
from megarlhf.data.sampler import ResumableSampler, even_split
from megarlhf.parallel.state import ParallelState
from megarlhf.trainers.config import resolve_batch
from megarlhf.trainers.loop import TrainerHooks, TrainLoop
from megarlhf.trainers.reward_norm import demonstration_batches, normalize_reward_bias
from megarlhf.trainers.rm_config import RMConfig, RMRunConfig

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


class RMTrainer(TrainLoop):
    """Reward-model training of one run (one output directory).

    Args:
        cfg: the run config (rm.global_batch_size is resolved here for this DP size).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    counters_cls = RMCounters

    def __init__(
        self,
        cfg: RMRunConfig,
        ps: ParallelState,
        output_dir: str | Path,
        hooks: TrainerHooks | None = None,
    ):
        super().__init__(resolve_batch(cfg, ps.dp_size, "rm", " prompts"), ps, output_dir, hooks)

    @property
    def loop_cfg(self) -> RMConfig:
        return self.cfg.rm

    # ----------------------------------------------------------------------------- data

    def build_data(self) -> None:
        cfg, ps, tok = self.cfg, self.ps, self.tokenizer
        d, r = cfg.data, cfg.rm
        train = load_ranking_dataset(
            d.train_files, tok, d.seq_len, d.template, d.max_k, d.skip_invalid
        )
        sampler = ResumableSampler(
            len(train.samples), r.micro_batch_size, r.grad_accum, ps.dp_rank, ps.dp_size, d.seed
        )
        self.loader = RankingLoader(train.samples, tok.pad_id, sampler)
        self.eval_batches = self._eval_batches() if r.eval_files else None
        self.norm_batches = None
        if r.normalize_files:
            self.norm_batches = demonstration_batches(
                r.normalize_files,
                tok,
                d.seq_len,
                d.template,
                r.normalize_micro_batch_size,
                ps,
                d.skip_invalid,
            )

    def _eval_batches(self) -> list[dict]:
        """This DP rank's micro-batches of held-out prompts (as many on every DP rank)."""
        d, r = self.cfg.data, self.cfg.rm
        data = load_ranking_dataset(
            r.eval_files, self.tokenizer, d.seq_len, d.template, d.max_k, d.skip_invalid
        )
        out = []
        split = even_split(len(data.samples), r.micro_batch_size, self.ps.dp_rank, self.ps.dp_size)
        for idx, filler in split:
            mb = collate_rankings([data.samples[i] for i in idx], self.tokenizer.pad_id)
            mb["filler"] = filler
            out.append(mb)
        return out

    # ----------------------------------------------------------------------------- steps

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        ps = self.ps
        prompts, tokens = self.sum_over_dp(
            [
                sum(len(mb["group_sizes"]) for mb in micro_batches),
                sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
            ]
        )
        self.engine.begin_step(len(micro_batches))
        stats = self.fwd_bwd(
            model=self.engine,
            micro_batches=micro_batches,
            loss_fn=make_rm_loss_fn(prompts),
            ps=ps,
            backward_fn=self.engine.backward,
        )
        out = self.engine.step()
        rec = summarize(self.sum_over_replicas(_totals(stats)))
        return {**rec, "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens": int(tokens)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, pair accuracy and margin over the held-out prompts (all DP ranks')."""
        self.engine.train(False)
        stats = self.fwd_bwd(
            model=self.engine,
            micro_batches=self.to_device(self.eval_batches),
            loss_fn=make_rm_loss_fn(1.0),
            ps=self.ps,
            forward_only=True,
        )
        self.engine.train(True)
        rec = summarize(self.sum_over_replicas(_totals(stats)), prefix="eval_")
        keep = ("eval_loss", "eval_accuracy", "eval_margin", "eval_reward_mean", "eval_prompts")
        return {k: rec[k] for k in keep}

    def count(self, rec: dict) -> None:
        c = self.counters
        c.tokens += rec["tokens"]
        c.prompts += rec["prompts"]
        c.pairs += rec["pairs"]

    def on_train_end(self) -> dict:
        """Reward normalization on the demonstrations, before the final checkpoint."""
        if not self.norm_batches:
            return {}
        batches = self.to_device(self.norm_batches)
        mean = normalize_reward_bias(self.engine, batches, self.ps, self.cfg.rm.pipeline_schedule)
        self.counters.reward_offset += mean
        return {"demo_reward_mean": mean, "reward_offset": self.counters.reward_offset}

    def summary(self, step: int, total: int, rec: dict) -> str:
        line = (
            f"step {step}/{total} loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} "
            f"reward {rec['reward_mean']:+.3f}±{rec['reward_std']:.3f} lr {rec['lr']:.3e} "
            f"grad_norm {rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
        )
        if "eval_accuracy" in rec:
            line += f" eval_loss {rec['eval_loss']:.4f} eval_acc {rec['eval_accuracy']:.3f}"
        if "demo_reward_mean" in rec:
            line += f" normalized (demo mean {rec['demo_reward_mean']:+.4f} -> 0)"
        return line
