"""The one training loop: the cadence every stage (SFT, RM, PPO) shares.

`TrainLoop.train()` owns what does not depend on what a step computes: the run folder and its
config.yaml, the metrics sinks (`metrics.jsonl`, TensorBoard), the progress bar and one-line
summaries, step counting, evaluation cadence, `checkpoint.save_every` and the final save, the
hooks (`on_step_end(step, record)`, `before_checkpoint_commit(step)`, which the tools' fault
injection uses), and restoring every RNG last before training continues. A trainer subclasses it
and provides:

    build()           data, models, engines; set counters (a dataclass with `step`),
                      total_steps, resumed_from (the checkpoint resumed, or None); run once, by
                      `setup()` or the first `train()`
    train_step()      one step -> its record (metrics; the loop adds step_time_s, tokens_per_s)
    save()            a checkpoint of the current state, through checkpoint.training
    rng_trackers()    the per-rank RNG trackers restored on resume
    evaluate()        held-out metrics, when eval_due(step, final)
    on_train_end()    work after the last step, before its checkpoint (merged into its record)
    count(rec)        fold a record into the counters; returns fields added to the record
    summary(step, rec), progress_fields(rec)   what the log line and the bar show

`SingleModelTrainer` is the part SFT and RM share on top: one model trained over a fixed dataset.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megarlhf.checkpoint import training as ckpt
from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.config import ConfigError, save_config, to_dict
from megarlhf.data.tokenizer import Tokenizer, load_tokenizer
from megarlhf.model.gpt import GPTModel
from megarlhf.optim.deepspeed_model import DeepSpeedModel
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.random import default_seed
from megarlhf.parallel.scalars import broadcast_object
from megarlhf.parallel.state import ParallelState
from megarlhf.utils.metrics import MetricsLogger
from megarlhf.utils.progress import Progress
from megarlhf.utils.trackers import Trackers

logger = logging.getLogger(__name__)


@dataclass
class TrainerHooks:
    """Optional callbacks (tools use them for fault injection, tests to watch steps)."""

    # Called on every rank after each step (and its checkpoint) with the step number and the
    # step's record.
    on_step_end: Callable[[int, dict], None] | None = None
    # Called inside a checkpoint save after this rank wrote its files, before the commit.
    before_checkpoint_commit: Callable[[int], None] | None = None


def seed_everything(seed: int, ps: ParallelState) -> None:
    """Seed python, numpy and torch's default stream (equal across TP, per pipeline stage)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(default_seed(seed, ps))


def checked_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """The run's tokenizer, refused when its ids do not fit model.vocab_size."""
    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
            f"ids ({path})"
        )
    return tok


def resume_point(output_dir: Path, cfg, ps: ParallelState) -> Path | None:
    """The checkpoint this run resumes from (rank 0 decides, every rank agrees), checked
    against the layout before any collective load."""
    root = output_dir / ckpt.CHECKPOINTS_DIR
    found = ckpt.find_resume_checkpoint(root, cfg.checkpoint.resume) if ps.rank == 0 else None
    found = broadcast_object(found, ps)
    if found is not None:
        ckpt.check_resume_layout(found, ps, cfg.deepspeed.zero_stage)
    return found


def open_run_dir(output_dir: Path, cfg, resume_step: int) -> MetricsLogger:
    """Rank 0 at the start of training: the output folder, the run's config.yaml, and the metrics
    sinks of `cfg.logging` (continuing after `resume_step` when resuming, -1 for a fresh run;
    the W&B / MLflow runs reopened from trackers.json)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / ckpt.CONFIG_FILE)
    log = cfg.logging
    trackers = Trackers(output_dir, log, to_dict(cfg), resume_step)
    return MetricsLogger(output_dir, log.tensorboard, resume_step, trackers)


class TrainLoop:
    """One training run (one output directory) of a stage; see the module docstring.

    Args:
        cfg: the run config (its `loop`, `checkpoint` and `logging` sections drive the cadence).
        ps: this rank's layout (process groups already built).
        output_dir: where metrics, TensorBoard files, config and checkpoints go.
        hooks: optional callbacks.
    """

    # The record field counted by tokens_per_s.
    throughput_field = "tokens"

    def __init__(self, cfg, ps: ParallelState, output_dir: str | Path, hooks=None):
        self.cfg, self.ps = cfg, ps
        self.output_dir = Path(output_dir)
        self.ckpt_root = self.output_dir / ckpt.CHECKPOINTS_DIR
        self.hooks = hooks or TrainerHooks()
        self.is_rank0 = ps.rank == 0
        self.ready = False

    # ----------------------------------------------------------------------------- stage parts

    def build(self) -> None:
        raise NotImplementedError

    def setup(self) -> None:
        """Build everything before the first step (once)."""
        if not self.ready:
            self.build()
            self.ready = True

    def train_step(self) -> dict:
        raise NotImplementedError

    def save(self) -> Path:
        raise NotImplementedError

    def rng_trackers(self) -> dict:
        raise NotImplementedError

    def eval_due(self, step: int, final: bool) -> bool:
        return False

    def evaluate(self) -> dict:
        return {}

    def on_train_end(self) -> dict:
        return {}

    def count(self, rec: dict) -> dict:
        """Fold one step's record into the counters (the loop counts the step itself); returns
        fields to add to the record."""
        return {}

    def summary(self, step: int, rec: dict) -> str:
        raise NotImplementedError

    def progress_fields(self, rec: dict) -> dict:
        return {}

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Train to the last step; returns the final record (with its checkpoint, if saved)."""
        self.setup()
        cfg, c = self.cfg, self.counters
        resumed = self.resumed_from is not None
        metrics = None
        if self.is_rank0:
            metrics = open_run_dir(self.output_dir, cfg, c.step if resumed else -1)
        progress = Progress(
            self.total_steps, c.step, enabled=self.is_rank0 and cfg.logging.progress_bar
        )
        if resumed:  # last, so nothing in between draws from them
            ckpt.restore_rng(self.resumed_from, self.ps, self.rng_trackers())
        last: dict = {"step": c.step}
        saved_at = c.step if resumed else -1
        while c.step < self.total_steps:
            rec = self.run_step()
            final = c.step == self.total_steps
            if self.eval_due(c.step, final):
                rec.update(self.evaluate())
            if final:
                rec.update(self.on_train_end())
            last = {"step": c.step, **rec}
            if metrics is not None:
                metrics.log(c.step, rec)
            progress.update(self.progress_fields(rec))
            every = cfg.logging.log_every
            if self.is_rank0 and every and (c.step % every == 0 or final):
                progress.write(self.summary(c.step, rec))
            save_every = cfg.checkpoint.save_every
            if (save_every and c.step % save_every == 0) or (final and cfg.checkpoint.save_final):
                last["checkpoint"] = str(self.save())
                saved_at = c.step
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(c.step, rec)
        if cfg.checkpoint.save_final and saved_at != c.step:
            last["checkpoint"] = str(self.save())  # resumed at the end: nothing new to train
        progress.close()
        if metrics is not None:
            metrics.close()
        return last

    def run_step(self) -> dict:
        """One step, counted: the stage's record plus step_time_s and tokens_per_s."""
        t0 = time.perf_counter()
        rec = self.train_step()
        dt = time.perf_counter() - t0
        self.counters.step += 1
        rec.update(self.count(rec))
        rec.update(step_time_s=dt, tokens_per_s=rec[self.throughput_field] / dt)
        return rec

    def counters_state(self) -> dict:
        return asdict(self.counters)


@dataclass
class TrainCounters:
    """Progress counters of SFT, saved with every checkpoint."""

    # Optimizer steps completed.
    step: int = 0
    # Non-padding tokens consumed (global, all DP ranks).
    tokens: int = 0
    # Loss tokens (response tokens) consumed (global).
    loss_tokens: int = 0


class SingleModelTrainer(TrainLoop):
    """One model trained over a fixed dataset (SFT, RM). Subclasses provide:

    section           the stage's config section (cfg.sft / cfg.rm): loop, passes
    build_data()      self.loader (next_step / epoch / steps_per_epoch / state_dict) and
                      whatever evaluation needs, for `self.passes` (grad_accum resolved)
    train_step(mbs)   one optimizer step over this rank's micro-batches -> record
    """

    counters_cls: type = TrainCounters
    stage = "sft"

    @property
    def section(self):
        raise NotImplementedError

    def build_data(self) -> None:
        raise NotImplementedError

    def build(self) -> None:
        """Data, model, engine, and (when resuming) the restored state."""
        cfg, ps, loop = self.cfg, self.ps, self.section.loop
        self.passes = cfg.resolved_passes(ps.dp_size)
        seed_everything(loop.seed, ps)
        self.tokenizer = checked_tokenizer(cfg.data.text.tokenizer, cfg.model.vocab_size)
        self.build_data()
        self.total_steps = loop.max_steps or self.passes.epochs * self.loader.steps_per_epoch
        self.resumed_from = resume_point(self.output_dir, cfg, ps)
        module = GPTModel(cfg.model, ps, seed=loop.seed)
        if self.resumed_from is None and cfg.checkpoint.init_from:
            load_init_weights(module, cfg.checkpoint.init_from, ps)
        self.model = DeepSpeedModel(
            module,
            ps,
            optim=cfg.optim,
            deepspeed=cfg.deepspeed,
            micro_batch_size=loop.micro_batch_size,
            grad_accum=self.passes.grad_accum,
            total_steps=self.total_steps,
        )
        self.counters = self.counters_cls()
        if self.resumed_from is not None:
            state = ckpt.load_checkpoint(self.resumed_from, models={"": self.model}, ps=ps)
            self.counters = self.counters_cls(**state["counters"])
            self.loader.load_state_dict(state["loader"])
            logger.info("resumed from %s at step %d", self.resumed_from, self.counters.step)
        self.fwd_bwd = get_forward_backward_func(ps, loop.pipeline_schedule)
        self.model.train(True)

    def run_step(self) -> dict:
        epoch = self.loader.epoch
        rec = super().run_step()
        rec["epoch"] = epoch
        return rec

    def train_step(self) -> dict:
        return self.optimizer_step(self.to_device(self.loader.next_step()))

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        raise NotImplementedError

    def accumulate_and_step(self, micro_batches: list[dict], loss_fn) -> tuple[list[dict], dict]:
        """Forward-backward over this rank's micro-batches, then one optimizer step; returns
        the schedule's stats and the step's {"grad_norm", "lr"}."""
        self.model.begin_step(len(micro_batches))
        stats = self.fwd_bwd(
            model=self.model,
            micro_batches=micro_batches,
            loss_fn=loss_fn,
            ps=self.ps,
            backward_fn=self.model.backward,
        )
        return stats, self.model.step()

    def eval_due(self, step: int, final: bool) -> bool:
        every = self.passes.eval_every
        return bool(self.passes.eval_files) and (final or (every and step % every == 0))

    def rng_trackers(self) -> dict:
        return {"tp_dropout": self.model.module.rng}

    def to_device(self, batches: list[dict]) -> list[dict]:
        """Micro-batches with their tensors on the model's device (DeepSpeed moved the model to
        the rank's accelerator; the loaders build batches on the CPU)."""
        device = self.model.device
        if device.type == "cpu":
            return batches
        return [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
            for mb in batches
        ]

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_root,
            models={"": self.model},
            ps=self.ps,
            counters=self.counters_state(),
            loop_state={"loader": self.loader.state_dict()},
            trackers=self.rng_trackers(),
            run_config=self.cfg,
            keep_last=self.cfg.checkpoint.keep_last,
            stage=self.stage,
            before_commit=self.hooks.before_checkpoint_commit,
            model_only=self.cfg.checkpoint.save_only_model,
        )

    def progress_fields(self, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}

    def summary(self, step: int, rec: dict) -> str:
        return (
            f"step {step}/{self.total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
            f"grad_norm {rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
        )
