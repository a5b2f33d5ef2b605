"""Supervised fine-tuning: the first InstructGPT stage, as one trainer object.

One optimizer step takes this rank's `grad_accum` micro-batches of packed rows (the data loader
already gives each data-parallel rank its slice of the global batch), runs them through the
forward-backward schedule of the layout (plain accumulation at pp=1, 1F1B otherwise) with the
DeepSpeed engine doing every backward, and steps once.

Loss: cross-entropy on response tokens only (labels are -100 elsewhere), summed and divided by
the number of loss tokens in the *global* batch (all micro-batches of all DP ranks), so every
response token weighs the same whatever the micro-batch size, accumulation steps, DP size or
packing. The reported loss is that same global mean.

Everything the step needs to be resumed bitwise (weights, optimizer, scheduler, data position,
counters, every RNG of every rank) is in the checkpoint (`checkpoint/training.py`). The step loop,
metrics, evaluation and checkpoint cadence, resume and `checkpoint.init_from` are the shared
loop (`loop.py`); this file holds what is SFT-specific: the data and the loss.
"""

from __future__ import annotations

import torch

from megarlhf.config.sft import SFTRunConfig
from megarlhf.data.loader import build_rows, build_sft_loader
from megarlhf.data.packing import IGNORE_INDEX, collate_rows
from megarlhf.data.sampler import even_split
from megarlhf.data.sft import load_sft_dataset
from megarlhf.parallel.cross_entropy import vocab_parallel_cross_entropy
from megarlhf.parallel.scalars import sum_over_dp, sum_over_replicas
from megarlhf.trainers.loop import SingleModelTrainer


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross-entropy [b, s] (fp32, 0 where labels == -100) from a logits shard."""
    return vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group).float()


def make_sft_loss_fn(num_loss_tokens: float, tp_group):
    """loss_fn(logits_shard, micro_batch) -> (loss, stats) for the forward-backward schedule.

    Args:
        num_loss_tokens: loss tokens in the whole global batch (the normalizer).
        tp_group: tensor-parallel group of the vocab-parallel logits.
    Returns:
        a function giving loss = sum of this micro-batch's token losses / num_loss_tokens and
        stats {"loss_sum": that sum (detached), "tokens": its loss-token count}.
    """

    def loss_fn(logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        per_token = token_losses(logits, mb["labels"], tp_group)
        total = per_token.sum()
        n = (mb["labels"] != IGNORE_INDEX).sum()
        return total / num_loss_tokens, {"loss_sum": total.detach(), "tokens": n}

    return loss_fn


class SFTTrainer(SingleModelTrainer):
    """Supervised fine-tuning of one run (one output directory).

    Args:
        cfg: the run config (sft.grad_accum is derived per DP size from sft.global_batch_size).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    cfg: SFTRunConfig
    stage = "sft"

    @property
    def section(self):
        return self.cfg.sft

    # ----------------------------------------------------------------------------- data

    def build_data(self) -> None:
        cfg, ps = self.cfg, self.ps
        self.loader = build_sft_loader(
            cfg.data,
            self.tokenizer,
            micro_batch_size=cfg.sft.loop.micro_batch_size,
            grad_accum=self.passes.grad_accum,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
        )
        self.eval_batches = self._eval_batches() if self.passes.eval_files else None

    def _eval_batches(self) -> list[dict]:
        """This DP rank's micro-batches of the held-out files.

        Every rank gets the same number of micro-batches (`even_split`), so collectives inside the
        forward (ZeRO-3 parameter gathers, TP/PP communication) match across DP ranks; a filler
        micro-batch repeats row 0 with every label ignored, so it counts nothing.
        """
        d, mbs = self.cfg.data, self.cfg.sft.loop.micro_batch_size
        data = load_sft_dataset(
            self.passes.eval_files, self.tokenizer, d.seq_len, d.text.template, d.skip_invalid,
            d.rows,
        )  # fmt: skip
        rows = build_rows(data, d.seq_len, d.pack, d.seed)
        batches = []
        for idx, filler in even_split(len(rows), mbs, self.ps.dp_rank, self.ps.dp_size):
            mb = collate_rows(
                [[data.samples[i] for i in rows[r]] for r in idx], d.seq_len, self.tokenizer.pad_id
            )
            if filler:
                mb["labels"] = torch.full_like(mb["labels"], IGNORE_INDEX)
            batches.append(mb)
        return batches

    # ----------------------------------------------------------------------------- steps

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        ps = self.ps
        loss_tokens, tokens = (
            int(x)
            for x in sum_over_dp(
                [
                    sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches),
                    sum(int((mb["segment_ids"] != 0).sum()) for mb in micro_batches),
                ],
                ps,
            )
        )
        loss_fn = make_sft_loss_fn(float(max(loss_tokens, 1)), ps.tp_group)
        stats, out = self.accumulate_and_step(micro_batches, loss_fn)
        (loss_sum,) = sum_over_replicas([sum(float(s["loss_sum"]) for s in stats)], ps)
        return {
            "loss": loss_sum / max(loss_tokens, 1),
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "loss_tokens": loss_tokens,
            "tokens": tokens,
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean token loss over the held-out files (all DP ranks' rows)."""
        self.model.train(False)
        loss_sum = count = 0.0
        if self.eval_batches:
            stats = self.fwd_bwd(
                model=self.model,
                micro_batches=self.to_device(self.eval_batches),
                loss_fn=make_sft_loss_fn(1.0, self.ps.tp_group),
                ps=self.ps,
                forward_only=True,
            )
            loss_sum = sum(float(s["loss_sum"]) for s in stats)
            count = sum(float(s["tokens"]) for s in stats)
        self.model.train(True)
        loss_sum, count = sum_over_replicas([loss_sum, count], self.ps)
        return {"eval_loss": loss_sum / max(count, 1.0), "eval_tokens": int(count)}

    def count(self, rec: dict) -> dict:
        self.counters.tokens += rec["tokens"]
        self.counters.loss_tokens += rec["loss_tokens"]
        return {"total_tokens": self.counters.tokens}

    def summary(self, step: int, rec: dict) -> str:
        line = super().summary(step, rec)
        if "eval_loss" in rec:
            line += f" eval_loss {rec['eval_loss']:.4f}"
        return line
