"""Direct preference optimization (DPO, and IPO with `dpo.loss=ipo`) as one trainer object.

The data and batching are the reward model's: a micro-batch holds whole prompts, all K completions
of each forwarded once as right-padded rows `[sum K, S]`, and every within-prompt pair is formed
afterwards (`algos.dpo.preference_loss`), so the C(K, 2) comparisons of a prompt are one batch
element. The model is a language model: the last stage runs the LM head only at the positions that
predict a response token (`output_index`), the vocab-parallel fused log-probs
(`kernels.logprobs_from_logits`) give each token's log-prob, and their sum per completion is the
completion's log-prob.

The reference is the frozen initial policy (`checkpoint.init_from`, or the same seeded random
initialization), never trained and not saved: a resumed run rebuilds it from the same source.
Under LoRA (model.lora.rank > 0) it is the policy's own frozen base, the policy with its adapters
off (`model.lora.AdaptersOffReference`): no second copy of the weights is built.
`reference_logprobs(micro_batches)` is its one forward (forward-only, through the same schedule
and layout as the policy); the trainer calls it for every training batch, or, with
`dpo.precompute_reference=true`, once over the whole training set before step 1 (a column of the
loader, saved with every checkpoint so a resumed run uses the very same values) after which the
reference model is freed. The held-out set's reference log-probs are computed once, at build.

Loss normalization (as the RM): each micro-batch contributes (sum of its prompts' mean pair losses)
/ P with P the prompts of the *global* batch, the engine sums gradients, so the step's loss is the
mean over the global batch's prompts whatever the micro-batch size, accumulation, DP size or K.

Metrics per step: loss, accuracy (pairs whose winner has the larger implicit reward
beta * (log pi - log ref)), margin (mean implicit-reward difference), chosen_reward /
rejected_reward (mean implicit rewards of the pairs' winners / losers), prompts, pairs, lr,
grad_norm, tokens; eval_* the same on `dpo.eval_files`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarlhf.algos.dpo import preference_loss, sequence_logps
from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.config.dpo import DPORunConfig, PreferenceLossConfig
from megarlhf.data.ranking_loader import (
    PreferenceLoader,
    load_preference_dataset,
    preference_batches,
)
from megarlhf.data.sampler import ResumableSampler
from megarlhf.engine.offload import FrozenModel
from megarlhf.kernels import logprobs_from_logits
from megarlhf.model.gpt import GPTModel
from megarlhf.model.lora import AdaptersOffReference
from megarlhf.parallel.scalars import sum_over_dp, sum_over_replicas
from megarlhf.trainers.loop import SingleModelTrainer

logger = logging.getLogger(__name__)

# Micro-batches per forward-only pass when scoring a whole set with the reference (the held-out
# set, or the training set for dpo.precompute_reference): bounds what is on the device at once.
REFERENCE_CHUNK = 32
# Sums a step / an evaluation accumulates per micro-batch, in this order.
_SUMS = ("loss_sum", "prompts", "pairs", "correct", "margin_sum", "chosen_sum", "rejected_sum")


@dataclass
class DPOCounters:
    """Progress counters saved with every checkpoint."""

    # Optimizer steps completed.
    step: int = 0
    # Non-padding tokens consumed (all completions, all DP ranks).
    tokens: int = 0
    # Prompts consumed (global).
    prompts: int = 0
    # Within-prompt pairs trained on (global).
    pairs: int = 0


def response_logps(logits: torch.Tensor, mb: dict, tp_group) -> torch.Tensor:
    """Summed response log-prob of each completion, fp32 [N], from the logits shard [T, V / tp]
    of the micro-batch's scored positions (`collate_preferences`)."""
    token_logps = logprobs_from_logits(logits, mb["labels"], tp_group=tp_group)
    return sequence_logps(token_logps, mb["token_seq"], mb["input_ids"].shape[0])


def make_dpo_loss_fn(num_prompts: float, algo: PreferenceLossConfig, tp_group):
    """loss_fn(logits_shard, micro_batch) -> (loss, stats) for the forward-backward schedule.

    Args:
        num_prompts: prompts in the whole global batch (the normalizer).
        algo: the loss, beta and label smoothing.
        tp_group: tensor-parallel group of the vocab-parallel logits.
    Returns:
        a function giving loss = sum over this micro-batch's prompts of their mean pair loss,
        divided by num_prompts, and stats with the sums of `_SUMS` (a micro-batch flagged
        `filler` counts nothing); the micro-batch must carry `reference_logps` [N].
    """

    def loss_fn(logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        logps = response_logps(logits, mb, tp_group)
        group_sizes = mb["group_sizes"].tolist()
        losses, st = preference_loss(
            logps, mb["reference_logps"], group_sizes, mb["ranks"], algo.beta, algo.loss,
            algo.label_smoothing,
        )  # fmt: skip
        total = losses.sum()
        sums = {"loss_sum": float(total.detach()), "prompts": float(len(group_sizes))}
        sums.update(pairs=st.pairs, correct=st.correct, margin_sum=st.margin_sum)
        sums.update(chosen_sum=st.chosen_sum, rejected_sum=st.rejected_sum)
        if mb.get("filler"):
            sums = dict.fromkeys(sums, 0.0)
        return total / num_prompts, sums

    return loss_fn


def make_logps_fn(tp_group):
    """Forward-only loss_fn: each completion's summed response log-prob (stats["logps"] [N])."""

    def logps_fn(logits: torch.Tensor, mb: dict) -> tuple[None, dict]:
        return None, {"logps": response_logps(logits, mb, tp_group)}

    return logps_fn


def _totals(stats: list[dict]) -> list[float]:
    return [sum(float(s[k]) for s in stats) for k in _SUMS]


def summarize(sums: list[float], prefix: str = "") -> dict:
    """Metrics of global sums in `_SUMS` order."""
    t = dict(zip(_SUMS, sums, strict=True))
    pairs = max(t["pairs"], 1.0)
    out = {
        "loss": t["loss_sum"] / max(t["prompts"], 1.0),
        "accuracy": t["correct"] / pairs,
        "margin": t["margin_sum"] / pairs,
        "chosen_reward": t["chosen_sum"] / pairs,
        "rejected_reward": t["rejected_sum"] / pairs,
        "prompts": int(t["prompts"]),
        "pairs": int(t["pairs"]),
    }
    return {prefix + k: v for k, v in out.items()}


class DPOTrainer(SingleModelTrainer):
    """DPO / IPO training of one run (one output directory).

    Args:
        cfg: the run config (dpo.grad_accum is derived per DP size from dpo.global_batch_size).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    cfg: DPORunConfig
    counters_cls = DPOCounters
    stage = "dpo"

    @property
    def section(self):
        return self.cfg.dpo

    # ----------------------------------------------------------------------------- data

    def build_data(self) -> None:
        cfg, ps, tok = self.cfg, self.ps, self.tokenizer
        d, mbs = cfg.data, cfg.dpo.loop.micro_batch_size
        args = (tok, d.seq_len, d.text.template, d.max_k, d.skip_invalid, d.rows)
        train = load_preference_dataset(d.train_files, *args)
        sampler = ResumableSampler(
            len(train.samples), mbs, self.passes.grad_accum, ps.dp_rank, ps.dp_size, d.seed
        )
        self.loader = PreferenceLoader(train.samples, tok.pad_id, sampler)
        self.eval_batches = None
        if self.passes.eval_files:
            held_out = load_preference_dataset(self.passes.eval_files, *args)
            self.eval_batches = preference_batches(
                held_out.samples, tok.pad_id, mbs, ps.dp_rank, ps.dp_size
            )

    # ----------------------------------------------------------------------------- reference

    def build(self) -> None:
        """The policy (the shared build), then the reference and what is precomputed with it."""
        super().build()
        self.reference = self.build_reference()
        if self.eval_batches:  # the held-out set's reference log-probs never change
            for mb, ref in zip(self.eval_batches, self.score_reference(self.eval_batches),
                               strict=True):  # fmt: skip
                if ref is not None:
                    mb["reference_logps"] = ref
        if self.cfg.dpo.precompute_reference:
            if self.loader.reference_logps is None:  # a resumed run restored the saved column
                self.loader.reference_logps = self.precompute_reference()
            self.reference = None  # no longer needed: free its memory

    def build_reference(self) -> FrozenModel | AdaptersOffReference:
        """The frozen reference: the initial policy (checkpoint.init_from, else the seeded random
        initialization the policy started from), on the policy's device. Under LoRA that is the
        policy's own frozen base: the policy with its adapters off, no second copy."""
        cfg = self.cfg
        if cfg.model.lora.enabled:
            return AdaptersOffReference(self.model.module)
        module = GPTModel(cfg.model, self.ps, seed=cfg.dpo.loop.seed)
        if cfg.checkpoint.init_from:
            load_init_weights(module, cfg.checkpoint.init_from, self.ps)
        else:
            logger.warning("reference: no checkpoint.init_from, the seeded random initialization")
        return FrozenModel(module, self.model.device)

    @torch.no_grad()
    def reference_logprobs(self, micro_batches: list[dict]) -> list[torch.Tensor | None]:
        """Each micro-batch's summed response log-probs [N] under the frozen reference, forward
        only through the policy's schedule and layout; None on stages other than the last.
        Collective over the pipeline (every stage calls it with the same micro-batches)."""
        with self.reference.use() as model:
            stats = self.fwd_bwd(
                model=model,
                micro_batches=micro_batches,
                loss_fn=make_logps_fn(self.ps.tp_group),
                ps=self.ps,
                forward_only=True,
            )
        if not stats:
            return [None] * len(micro_batches)
        return [s["logps"] for s in stats]

    def attach_reference(self, micro_batches: list[dict]) -> None:
        """Set `reference_logps` on each micro-batch (last stage; the others never read it)."""
        for mb, ref in zip(micro_batches, self.reference_logprobs(micro_batches), strict=True):
            if ref is not None:
                mb["reference_logps"] = ref

    def score_reference(self, batches: list[dict]) -> list[torch.Tensor | None]:
        """`reference_logprobs` of CPU micro-batches, moved to the device `REFERENCE_CHUNK` at a
        time (a whole dataset never sits on the device); results on the CPU."""
        out = []
        for i in range(0, len(batches), REFERENCE_CHUNK):
            refs = self.reference_logprobs(self.to_device(batches[i : i + REFERENCE_CHUNK]))
            out += [None if r is None else r.float().cpu() for r in refs]
        return out

    def precompute_reference(self) -> torch.Tensor:
        """Reference log-probs of every training completion, fp32 [total completions], the same
        on every rank: each DP replica scores its share of the prompts in one pass, the last
        stage's TP rank 0 writes them, a sum over the world fills in the rest (exactly: each
        entry has one non-zero term)."""
        ps, loader = self.ps, self.loader
        mbs = self.cfg.dpo.loop.micro_batch_size
        batches = preference_batches(loader.samples, loader.pad_id, mbs, ps.dp_rank, ps.dp_size)
        table = torch.zeros(loader.offsets[-1], dtype=torch.float32)
        refs = self.score_reference(batches)
        if ps.is_last_stage and ps.tp_rank == 0:
            for mb, ref in zip(batches, refs, strict=True):
                if not mb["filler"]:
                    table[mb["completion_index"]] = ref
        if ps.world_size > 1:
            dist.all_reduce(table)
        logger.info("reference log-probs precomputed for %d completions", table.numel())
        return table

    # ----------------------------------------------------------------------------- steps

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        ps = self.ps
        if "reference_logps" not in micro_batches[0]:
            self.attach_reference(micro_batches)
        prompts, tokens = sum_over_dp(
            [
                sum(len(mb["group_sizes"]) for mb in micro_batches),
                sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
            ],
            ps,
        )
        loss_fn = make_dpo_loss_fn(prompts, self.cfg.dpo.algo, ps.tp_group)
        stats, out = self.accumulate_and_step(micro_batches, loss_fn)
        rec = summarize(sum_over_replicas(_totals(stats), ps))
        return {**rec, "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens": int(tokens)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, pair accuracy, margin and implicit rewards over the held-out prompts."""
        self.model.train(False)
        stats = self.fwd_bwd(
            model=self.model,
            micro_batches=self.to_device(self.eval_batches),
            loss_fn=make_dpo_loss_fn(1.0, self.cfg.dpo.algo, self.ps.tp_group),
            ps=self.ps,
            forward_only=True,
        )
        self.model.train(True)
        return summarize(sum_over_replicas(_totals(stats), self.ps), prefix="eval_")

    def count(self, rec: dict) -> dict:
        c = self.counters
        c.tokens += rec["tokens"]
        c.prompts += rec["prompts"]
        c.pairs += rec["pairs"]
        return {"total_tokens": c.tokens}

    def summary(self, step: int, rec: dict) -> str:
        line = (
            f"step {step}/{self.total_steps} loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} "
            f"margin {rec['margin']:+.3f} chosen {rec['chosen_reward']:+.3f} rejected "
            f"{rec['rejected_reward']:+.3f} lr {rec['lr']:.3e} grad_norm {rec['grad_norm']:.3f} "
            f"tokens/s {rec['tokens_per_s']:.0f}"
        )
        if "eval_accuracy" in rec:
            line += f" eval_loss {rec['eval_loss']:.4f} eval_acc {rec['eval_accuracy']:.3f}"
        return line
