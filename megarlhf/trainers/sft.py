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
counters, every RNG of every rank) is in the checkpoint (`checkpointing.py`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megarlhf.checkpoint.model_shards import load_model_shard, read_meta
from megarlhf.config import ConfigError, save_config, to_dict
from megarlhf.data.loader import SFTLoader, build_rows, build_sft_loader
from megarlhf.data.packing import IGNORE_INDEX, collate_rows
from megarlhf.data.sft import load_sft_dataset
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.random import default_seed
from megarlhf.parallel.state import ParallelState
from megarlhf.trainers import checkpointing as ckpt
from megarlhf.trainers.config import SFTRunConfig, resolve_batch
from megarlhf.trainers.engine import TrainEngine
from megarlhf.utils.metrics import MetricsLogger
from megarlhf.utils.progress import Progress

logger = logging.getLogger(__name__)

# ModelConfig fields that may differ between an init_from checkpoint and this run.
_NON_SHAPE_FIELDS = {
    "dtype",
    "activation_recompute",
    "hidden_dropout",
    "attention_dropout",
    "use_flash_attn",
    "init_std",
}


@dataclass
class TrainerHooks:
    """Optional callbacks (tools use them for fault injection in tests)."""

    # Called on every rank after each optimizer step (and its checkpoint), with the step number.
    on_step_end: Callable[[int], None] | None = None
    # Called inside a checkpoint save after this rank wrote its files, before the commit.
    before_checkpoint_commit: Callable[[int], None] | None = None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross-entropy [b, s] (fp32, 0 where labels == -100) from a logits shard."""
    from megarlhf.parallel.cross_entropy import vocab_parallel_cross_entropy

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


def seed_everything(seed: int, ps: ParallelState) -> None:
    """Seed python, numpy and torch's default stream (equal across TP, per pipeline stage)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(default_seed(seed, ps))


class SFTTrainer:
    """Supervised fine-tuning of one run (one output directory).

    Args:
        cfg: the run config (sft.global_batch_size is resolved here for this DP size).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    def __init__(
        self,
        cfg: SFTRunConfig,
        ps: ParallelState,
        output_dir: str | Path,
        hooks: TrainerHooks | None = None,
    ):
        self.cfg, self.ps = resolve_batch(cfg, ps.dp_size), ps
        self.output_dir = Path(output_dir)
        self.ckpt_root = self.output_dir / ckpt.CHECKPOINTS_DIR
        self.hooks = hooks or TrainerHooks()
        self.is_rank0 = ps.rank == 0

    # ----------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Data, model, engine, and (when resuming) the restored state."""
        cfg, ps = self.cfg, self.ps
        seed_everything(cfg.sft.seed, ps)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids ({cfg.data.tokenizer})"
            )
        self.loader: SFTLoader = build_sft_loader(
            cfg.data,
            self.tokenizer,
            micro_batch_size=cfg.sft.micro_batch_size,
            grad_accum=cfg.sft.grad_accum,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
        )
        self.total_steps = cfg.sft.max_steps or cfg.sft.epochs * self.loader.steps_per_epoch
        self.eval_batches = self._eval_batches() if cfg.sft.eval_files else None

        resume_from = self._broadcast(
            ckpt.find_resume_checkpoint(self.ckpt_root, cfg.checkpoint.resume)
            if self.is_rank0
            else None
        )
        if resume_from is not None:
            ckpt.check_resume_layout(resume_from, ps, cfg.deepspeed.zero_stage)
        model = GPTModel(cfg.model, ps, seed=cfg.sft.seed)
        if resume_from is None and cfg.checkpoint.init_from:
            self._load_init_weights(model, Path(cfg.checkpoint.init_from))
        self.model = model
        self.engine = TrainEngine(model, cfg, ps, self.total_steps)
        self.counters = ckpt.TrainCounters()
        self.resumed_from = resume_from
        if resume_from is not None:
            state = ckpt.load_training_checkpoint(resume_from, engine=self.engine, ps=ps)
            self.counters = ckpt.TrainCounters(**state["counters"])
            self.loader.load_state_dict(state["loader"])
            logger.info("resumed from %s at step %d", resume_from, self.counters.step)
        self.fwd_bwd = get_forward_backward_func(ps, cfg.sft.pipeline_schedule)

    def _broadcast(self, obj):
        if self.ps.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _load_init_weights(self, model: GPTModel, path: Path) -> None:
        """Weights of a megarlhf checkpoint at any layout, re-sharded for this rank."""
        theirs = to_dict(read_meta(path).model)
        ours = to_dict(self.cfg.model)
        diff = sorted(k for k in ours if k not in _NON_SHAPE_FIELDS and ours[k] != theirs.get(k))
        if diff:
            raise ConfigError(
                f"checkpoint.init_from: {path} holds a different model: "
                + ", ".join(f"model.{k}={theirs.get(k)!r} (config has {ours[k]!r})" for k in diff)
            )
        ps = self.ps
        weights = load_model_shard(
            path, tp=ps.tp_size, tp_rank=ps.tp_rank, pp=ps.pp_size, pp_rank=ps.pp_rank
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights.pop(name))
        if weights:
            raise ConfigError(f"checkpoint.init_from: unexpected tensors {sorted(weights)[:5]}")
        logger.info("initialized weights from %s", path)

    def _eval_batches(self) -> list[dict]:
        """This DP rank's micro-batches of the held-out files (rows split round-robin)."""
        cfg = self.cfg
        data = load_sft_dataset(
            cfg.sft.eval_files,
            self.tokenizer,
            cfg.data.seq_len,
            cfg.data.template,
            cfg.data.skip_invalid,
        )
        rows = build_rows(data, cfg.data.seq_len, cfg.data.pack, cfg.data.seed)
        mine = rows[self.ps.dp_rank :: self.ps.dp_size]
        m = cfg.sft.micro_batch_size
        return [
            collate_rows(
                [[data.samples[i] for i in row] for row in mine[j : j + m]],
                cfg.data.seq_len,
                self.tokenizer.pad_id,
            )
            for j in range(0, len(mine), m)
        ]

    # ----------------------------------------------------------------------------- steps

    def _sum_over_replicas(self, values: list[float]) -> list[float]:
        """Sum per-DP-replica values held by the last stage (TP rank 0) over the world."""
        ps = self.ps
        t = torch.tensor(values, dtype=torch.float64)
        if not (ps.is_last_stage and ps.tp_rank == 0):
            t.zero_()
        if ps.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        ps = self.ps
        local = torch.tensor(
            [
                sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches),
                sum(int((mb["segment_ids"] != 0).sum()) for mb in micro_batches),
            ],
            dtype=torch.float64,
        )
        if ps.dp_group is not None:
            dist.all_reduce(local, group=ps.dp_group)
        loss_tokens, tokens = (int(x) for x in local.tolist())
        loss_fn = make_sft_loss_fn(float(max(loss_tokens, 1)), ps.tp_group)
        self.engine.begin_step(len(micro_batches))
        stats = self.fwd_bwd(
            model=self.engine,
            micro_batches=micro_batches,
            loss_fn=loss_fn,
            ps=ps,
            backward_fn=self.engine.backward,
        )
        out = self.engine.step()
        (loss_sum,) = self._sum_over_replicas([sum(float(s["loss_sum"]) for s in stats)])
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
        self.engine.train(False)
        loss_sum = count = 0.0
        if self.eval_batches:
            stats = self.fwd_bwd(
                model=self.engine,
                micro_batches=self.eval_batches,
                loss_fn=make_sft_loss_fn(1.0, self.ps.tp_group),
                ps=self.ps,
                forward_only=True,
            )
            loss_sum = sum(float(s["loss_sum"]) for s in stats)
            count = sum(float(s["tokens"]) for s in stats)
        self.engine.train(True)
        loss_sum, count = self._sum_over_replicas([loss_sum, count])
        return {"eval_loss": loss_sum / max(count, 1.0), "eval_tokens": int(count)}

    # ----------------------------------------------------------------------------- the loop

    def save(self) -> Path:
        return ckpt.save_training_checkpoint(
            self.ckpt_root,
            engine=self.engine,
            ps=self.ps,
            counters=self.counters,
            loader_state=self.loader.state_dict(),
            trackers={"tp_dropout": self.model.rng},
            run_config=self.cfg,
            keep_last=self.cfg.checkpoint.keep_last,
            before_commit=self.hooks.before_checkpoint_commit,
        )

    def train(self) -> dict:
        """Train to the last step; returns the final record (loss, eval_loss, checkpoint...)."""
        if not hasattr(self, "engine"):
            self.setup()
        cfg, c = self.cfg, self.counters
        metrics = None
        if self.is_rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / ckpt.CONFIG_FILE)
            resume_step = c.step if self.resumed_from is not None else -1
            metrics = MetricsLogger(self.output_dir, cfg.logging.tensorboard, resume_step)
        progress = Progress(
            self.total_steps, c.step, enabled=self.is_rank0 and cfg.logging.progress_bar
        )
        if self.resumed_from is not None:
            ckpt.restore_rng(self.resumed_from, self.ps, {"tp_dropout": self.model.rng})
        self.engine.train(True)
        last: dict = {"step": c.step}
        saved_at = c.step if self.resumed_from is not None else -1
        while c.step < self.total_steps:
            t0 = time.perf_counter()
            epoch = self.loader.epoch
            rec = self.train_step(self.loader.next_step())
            dt = time.perf_counter() - t0
            c.step += 1
            c.tokens += rec["tokens"]
            c.loss_tokens += rec["loss_tokens"]
            rec.update(
                epoch=epoch, step_time_s=dt, tokens_per_s=rec["tokens"] / dt, total_tokens=c.tokens
            )
            if cfg.sft.eval_files and (
                c.step == self.total_steps
                or (cfg.sft.eval_every and c.step % cfg.sft.eval_every == 0)
            ):
                rec.update(self.evaluate())
            last = {"step": c.step, **rec}
            if metrics is not None:
                metrics.log(c.step, rec)
            progress.update({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"})
            every = cfg.logging.log_every
            if self.is_rank0 and every and (c.step % every == 0 or c.step == self.total_steps):
                progress.write(_summary(c.step, self.total_steps, rec))
            final = c.step == self.total_steps
            if (cfg.checkpoint.save_every and c.step % cfg.checkpoint.save_every == 0) or (
                final and cfg.checkpoint.save_final
            ):
                last["checkpoint"] = str(self.save())
                saved_at = c.step
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(c.step)
        if cfg.checkpoint.save_final and saved_at != c.step:
            last["checkpoint"] = str(self.save())  # resumed at the end: nothing new to train
        progress.close()
        if metrics is not None:
            metrics.close()
        return last


def _summary(step: int, total: int, rec: dict) -> str:
    line = (
        f"step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
        f"grad_norm {rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
    )
    if "eval_loss" in rec:
        line += f" eval_loss {rec['eval_loss']:.4f}"
    return line
