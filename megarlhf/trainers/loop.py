"""The training loop shared by the SFT and reward-model stages.

`TrainLoop` owns everything that does not depend on what a batch is or how the loss is computed:
seeding, resume discovery and layout checks, building the model (optionally from
`checkpoint.init_from`) and the DeepSpeed `TrainEngine`, the step loop with its metrics
(`metrics.jsonl`, TensorBoard), progress bar and one-line summaries, evaluation and checkpoint
cadence, fault-injection hooks, and restoring every RNG last before training continues. A stage
subclasses it and provides:

    loop_cfg          the stage's loop section (sft / rm): seed, max_steps, epochs, eval_files,
                      eval_every, pipeline_schedule
    build_data()      self.loader (next_step / epoch / steps_per_epoch / state_dict) and
                      whatever evaluation needs
    train_step(mbs)   one optimizer step -> record with at least loss, lr, grad_norm, tokens
    evaluate()        held-out metrics (called when loop_cfg.eval_files is set)
    on_train_end()    optional work after the last step, before its checkpoint (its record is
                      merged into the last step's metrics)

Counters saved with each checkpoint are a dataclass (`counters_cls`); `count(rec)` adds a step's
record to them.
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

from megarlhf.config import ConfigError
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.random import default_seed
from megarlhf.parallel.scalars import broadcast_object, sum_over_dp, sum_over_replicas
from megarlhf.parallel.state import ParallelState
from megarlhf.trainers import checkpointing as ckpt
from megarlhf.trainers.engine import TrainEngine
from megarlhf.trainers.init_from import load_init_weights
from megarlhf.utils.progress import Progress

logger = logging.getLogger(__name__)


@dataclass
class TrainerHooks:
    """Optional callbacks (tools use them for fault injection in tests)."""

    # Called on every rank after each optimizer step (and its checkpoint), with the step number.
    on_step_end: Callable[[int], None] | None = None
    # Called inside a checkpoint save after this rank wrote its files, before the commit.
    before_checkpoint_commit: Callable[[int], None] | None = None


def seed_everything(seed: int, ps: ParallelState) -> None:
    """Seed python, numpy and torch's default stream (equal across TP, per pipeline stage)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(default_seed(seed, ps))


class TrainLoop:
    """One training run (one output directory) of a stage; see the module docstring.

    Args:
        cfg: the run config, already resolved for this DP size by the subclass.
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    counters_cls: type = ckpt.TrainCounters

    def __init__(self, cfg, ps: ParallelState, output_dir: str | Path, hooks=None):
        self.cfg, self.ps = cfg, ps
        self.output_dir = Path(output_dir)
        self.ckpt_root = self.output_dir / ckpt.CHECKPOINTS_DIR
        self.hooks = hooks or TrainerHooks()
        self.is_rank0 = ps.rank == 0

    # ----------------------------------------------------------------------------- stage parts

    @property
    def loop_cfg(self):
        raise NotImplementedError

    def build_data(self) -> None:
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict]) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def on_train_end(self) -> dict:
        return {}

    def count(self, rec: dict) -> None:
        """Add one step's record to the checkpointed counters (step is counted by the loop)."""
        self.counters.tokens += rec["tokens"]

    def summary(self, step: int, total: int, rec: dict) -> str:
        """The line printed every logging.log_every steps."""
        return (
            f"step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
            f"grad_norm {rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
        )

    # ----------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Data, model, engine, and (when resuming) the restored state."""
        cfg, ps, loop = self.cfg, self.ps, self.loop_cfg
        seed_everything(loop.seed, ps)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids ({cfg.data.tokenizer})"
            )
        self.build_data()
        self.total_steps = loop.max_steps or loop.epochs * self.loader.steps_per_epoch

        resume_from = self.broadcast(
            ckpt.find_resume_checkpoint(self.ckpt_root, cfg.checkpoint.resume)
            if self.is_rank0
            else None
        )
        if resume_from is not None:
            ckpt.check_resume_layout(resume_from, ps, cfg.deepspeed.zero_stage)
        model = GPTModel(cfg.model, ps, seed=loop.seed)
        if resume_from is None and cfg.checkpoint.init_from:
            load_init_weights(model, cfg.checkpoint.init_from, ps)
        self.model = model
        self.engine = TrainEngine(model, cfg, ps, self.total_steps)
        self.counters = self.counters_cls()
        self.resumed_from = resume_from
        if resume_from is not None:
            state = ckpt.load_training_checkpoint(resume_from, engine=self.engine, ps=ps)
            self.counters = self.counters_cls(**state["counters"])
            self.loader.load_state_dict(state["loader"])
            logger.info("resumed from %s at step %d", resume_from, self.counters.step)
        self.fwd_bwd = get_forward_backward_func(ps, loop.pipeline_schedule)

    # ----------------------------------------------------------------------------- helpers

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        return broadcast_object(obj, self.ps)

    def sum_over_replicas(self, values: list[float]) -> list[float]:
        """Sum per-DP-replica values held by the last stage (TP rank 0) over the world."""
        return sum_over_replicas(values, self.ps)

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum values every rank of a DP replica holds alike (batch sizes) over the replicas."""
        return sum_over_dp(values, self.ps)

    def to_device(self, batches: list[dict]) -> list[dict]:
        """Micro-batches with their tensors on the model's device (DeepSpeed moved the model to
        the rank's accelerator; the loaders build batches on the CPU)."""
        device = getattr(self.engine.engine, "device", None)
        if device is None or torch.device(device).type == "cpu":
            return batches
        return [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
            for mb in batches
        ]

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

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Train to the last step; returns the final record (loss, eval metrics, checkpoint...)."""
        if not hasattr(self, "engine"):
            self.setup()
        cfg, c, loop = self.cfg, self.counters, self.loop_cfg
        metrics = None
        if self.is_rank0:
            resume_step = c.step if self.resumed_from is not None else -1
            metrics = ckpt.open_run_dir(self.output_dir, cfg, resume_step, cfg.logging.tensorboard)
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
            rec = self.train_step(self.to_device(self.loader.next_step()))
            dt = time.perf_counter() - t0
            c.step += 1
            self.count(rec)
            rec.update(
                epoch=epoch, step_time_s=dt, tokens_per_s=rec["tokens"] / dt, total_tokens=c.tokens
            )
            final = c.step == self.total_steps
            if loop.eval_files and (final or (loop.eval_every and c.step % loop.eval_every == 0)):
                rec.update(self.evaluate())
            if final:
                rec.update(self.on_train_end())
            last = {"step": c.step, **rec}
            if metrics is not None:
                metrics.log(c.step, rec)
            progress.update({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"})
            every = cfg.logging.log_every
            if self.is_rank0 and every and (c.step % every == 0 or final):
                progress.write(self.summary(c.step, self.total_steps, rec))
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
