"""`TrainEngine`: a GPT stage driven by DeepSpeed (ZeRO data parallelism) inside our TP x PP layout.

DeepSpeed owns what it is good at: ZeRO partitioning of optimizer state / gradients / parameters
over the data-parallel group, bf16 with fp32 master weights, the optimizer step, its checkpoint
format. It learns our layout through `DeepSpeedMPU`, a Megatron-style `mpu` object built from a
`ParallelState`. We own the schedule (micro-batches, pipeline), the loss normalization, and the
things DeepSpeed cannot see across pipeline stages:

* Loss scale. Our loss is already normalized by the token count of the whole global batch, so the
  gradients must be *summed* over micro-batches and data-parallel ranks. DeepSpeed divides by the
  accumulation steps (unless `scale_wrt_gas=False`) and averages over DP; the last stage therefore
  back-propagates `loss * dp` with `scale_wrt_gas=False`. Other stages back-propagate the gradient
  they receive, which already carries that factor.
* Gradient-norm clipping over the whole model. ZeRO 1/2/3 compute the norm from their partitions,
  all-reduce it over DP and then over `mpu.get_model_parallel_group()` (our TP x PP group),
  counting a parameter on every rank if it is marked `tensor_model_parallel` and otherwise only
  on TP rank 0; `mark_parallel_parameters` sets those attributes from the model's sharding plan,
  and marks the last stage's copy of a tied embedding `ds_pipe_replicated` so it is not counted
  twice. ZeRO 0's fp32 path counts replicated parameters on *model-parallel* rank 0 only, which
  drops every pipeline stage but the first, so at stage 0 we clip ourselves (`_clip_stage0`).
* Tied embeddings with pp > 1. The first and last stage each hold a copy whose gradients must be
  summed before the step. ZeRO 1/2 reduce (and ZeRO 2 partitions) gradients inside backward, before
  the first stage has finished its micro-batches, so on those layouts each step runs inside
  DeepSpeed's `coalesce_grad_reduction()`: gradients stay on the parameters until the block ends,
  we sum the tied copies, and DeepSpeed then reduces once. (ZeRO 2 thereby holds full gradients
  during accumulation, like ZeRO 1.) ZeRO 0 all-reduces over DP first; summing the tied copies
  afterwards is the same sum.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megarlhf.config import ConfigError
from megarlhf.parallel.state import ParallelState, global_rank_of
from megarlhf.trainers.config import SFTRunConfig, check_supported

logger = logging.getLogger(__name__)

DS_SUBDIR = "deepspeed"
DS_TAG = "state"


# ----------------------------------------------------------------------------- the mpu


class DeepSpeedMPU:
    """The Megatron-style model-parallel unit DeepSpeed reads its process groups from.

    DeepSpeed treats a `None` group as the whole world, so every group here is a real process
    group, including size-1 ones (which `ParallelState` leaves as None). "Model parallel" is our
    TP x PP group: DeepSpeed all-reduces gradient norms over it, and its rank names DeepSpeed's
    per-rank checkpoint files (`mp_rank_XX`), so it must be unique within a data-parallel replica.

    Build it on every rank in the same order (group creation is collective).
    """

    def __init__(self, ps: ParallelState):
        self.ps = ps
        tp, pp, dp = ps.tp_size, ps.pp_size, ps.dp_size
        rank = ps.rank
        self._dp_ranks = list(ps.dp_ranks)
        mp_ranks = [global_rank_of(t, ps.dp_rank, p, tp, dp) for p in range(pp) for t in range(tp)]
        self._mp_rank = mp_ranks.index(rank)
        self._dp = ps.dp_group if dp > 1 else _singleton_group(rank)
        self._tp = ps.tp_group if tp > 1 else _singleton_group(rank)
        self._pp = ps.pp_group if pp > 1 else _singleton_group(rank)
        self._mp = ps.mp_group if tp * pp > 1 else _singleton_group(rank)

    # data parallel
    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return self.ps.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ps.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    # model parallel = TP x PP
    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_rank(self) -> int:
        return self._mp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ps.tp_size * self.ps.pp_size

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.tp_src_rank

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self._pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.pp_size


def _singleton_group(rank: int):
    # Only the member has to call new_group with local synchronization, so size-1 groups cost
    # nothing on the other ranks.
    return dist.new_group([rank], use_local_synchronization=True)


# ----------------------------------------------------------------------------- model preparation


def mark_parallel_parameters(model: nn.Module) -> None:
    """Tag parameters the way DeepSpeed's gradient-norm code expects (see the module docstring).

    `tensor_model_parallel`: the parameter is a TP shard (its norm is summed over TP ranks).
    `ds_pipe_replicated`: the last stage's copy of a tied word embedding (counted on the first).
    """
    for name, p in model.named_parameters():
        p.tensor_model_parallel = model.plan.get(name) is not None
        p.ds_pipe_replicated = name == "output.weight" and _tied_copy(model)


def _tied_copy(model) -> bool:
    """This stage holds the last-stage copy of a tied word embedding (pp > 1)."""
    return bool(model.cfg.tie_embeddings and model.post_process and not model.pre_process)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay, vectors (biases, norm weights) do not.

    Embedding matrices decay too (Megatron's default); their zero padding rows stay zero because
    decoupled decay and Adam both leave a zero parameter with zero gradient at zero.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(groups: list[dict], cfg: SFTRunConfig) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's FusedAdam on CUDA when `optim.impl=auto` and it loads."""
    o = cfg.optim
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if o.impl == "auto" and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as e:  # no compiler / CUDA toolkit: fall back, loudly
            logger.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW", e)
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def warmup_cosine_lr(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup reaches `lr` at step `warmup_steps - 1` (the first step already moves, with
    lr / warmup_steps); the cosine then runs `decay_steps` steps and stays at `min_lr` after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(step - warmup_steps, decay_steps) / max(decay_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer, cfg: SFTRunConfig, total_steps: int):
    """`torch.optim.lr_scheduler.LambdaLR` over `warmup_cosine_lr` (stepped by DeepSpeed)."""
    o = cfg.optim
    decay = o.decay_steps or max(total_steps - o.warmup_steps, 1)

    def factor(step: int) -> float:
        return (
            warmup_cosine_lr(
                step, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, decay_steps=decay
            )
            / o.lr
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(cfg: SFTRunConfig, dp_size: int) -> dict:
    """The DeepSpeed config dict for this run (batch sizes, ZeRO, precision, clipping).

    `cfg` is any stage's run config (SFTRunConfig, RMRunConfig): the batch shape comes from its
    loop section `cfg.loop` (DeepSpeed only books it; our schedule decides what a micro-batch is).
    """
    d, s = cfg.deepspeed, cfg.loop
    stage = d.zero_stage
    zero: dict = {
        "stage": stage,
        "overlap_comm": d.overlap_comm,
        "contiguous_gradients": d.contiguous_gradients,
        "reduce_bucket_size": d.reduce_bucket_size,
    }
    if stage in (1, 2):
        zero["allgather_bucket_size"] = d.allgather_bucket_size
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch_size * s.grad_accum * dp_size,
        # Stage 0 is clipped by us (DeepSpeed's fp32 path miscounts pipeline stages).
        "gradient_clipping": cfg.optim.clip_grad if stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def check_engine_supported(cfg: SFTRunConfig) -> None:
    """Refuse what this wrapper cannot drive, naming the keys (before building anything)."""
    check_supported(cfg.deepspeed.zero_stage, cfg.parallel.pp)
    if cfg.deepspeed.zero_stage == 0 and cfg.model.dtype == "bf16":
        raise ConfigError(
            "deepspeed.zero_stage: 0 runs fp32 only (DeepSpeed's stage-0 bf16 path keeps bf16 "
            "gradients without fp32 master weights); use deepspeed.zero_stage>=1 with "
            "model.dtype=bf16"
        )


# ----------------------------------------------------------------------------- the engine


class TrainEngine:
    """One rank's model stage under DeepSpeed, stepping one global batch at a time.

    Usage per optimizer step (every rank):

        engine.begin_step(num_micro_batches)
        ...  # for each micro-batch: engine(...) forward, then engine.backward(loss or out, grad)
        stats = engine.step()   # {"grad_norm", "lr"}

    `engine.backward` matches the pipeline schedule's `backward_fn(tensor, grad)` contract.

    Args:
        model: this rank's GPTModel stage (weights already initialized or loaded).
        cfg: the run config.
        ps: the layout.
        total_steps: optimizer steps of the whole run (sizes the cosine decay).
    """

    def __init__(self, model: nn.Module, cfg: SFTRunConfig, ps: ParallelState, total_steps: int):
        import deepspeed

        check_engine_supported(cfg)
        self.run_cfg, self.ps, self.model = cfg, ps, model
        self.zero_stage = cfg.deepspeed.zero_stage
        mark_parallel_parameters(model)
        if self.zero_stage == 3 and cfg.model.tie_embeddings and model.post_process:
            # The output layer reads the embedding weight outside its owning module's forward.
            deepspeed.zero.register_external_parameter(model, model.embedding.word.weight)
        optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        self.mpu = DeepSpeedMPU(ps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            mpu=self.mpu,
            config=deepspeed_config(cfg, ps.dp_size),
            dist_init_required=False,
        )
        self.tied_pipeline = bool(cfg.model.tie_embeddings and ps.pp_size > 1)
        self._coalesce = self.tied_pipeline and self.zero_stage in (1, 2)
        self._ctx = None
        self._num_micro = 0
        self._backwards = 0

    # -- forward / backward -------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The model DeepSpeed wraps (the pipeline schedule reads its config through this)."""
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def begin_step(self, num_micro_batches: int) -> None:
        """Start accumulating one optimizer step of `num_micro_batches` backward calls."""
        if self._ctx is not None:
            raise RuntimeError("begin_step called twice without step()")
        self._num_micro, self._backwards = num_micro_batches, 0
        if self._coalesce:
            # The block restores on exit the boundary flag it found on entry, and step() must
            # then see a boundary.
            self.engine.set_gradient_accumulation_boundary(True)
            self._ctx = self.engine.coalesce_grad_reduction()
            self._ctx.__enter__()
        else:
            self._ctx = True
        self.engine.set_gradient_accumulation_boundary(num_micro_batches == 1)

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Backward of one micro-batch: (loss, None) on the last stage, (output, grad) elsewhere.

        The loss must already be normalized for the whole global batch (see module docstring).
        """
        if self._ctx is None:
            raise RuntimeError("backward called outside begin_step()/step()")
        self._backwards += 1
        if self._backwards > self._num_micro:
            raise RuntimeError(f"more backward calls than the {self._num_micro} micro-batches")
        self.engine.set_gradient_accumulation_boundary(self._backwards == self._num_micro)
        if grad is None:
            # Undo DeepSpeed's average over DP: our loss wants the sum.
            scalar = tensor * self.ps.dp_size
        else:
            # Same parameter gradients as torch.autograd.backward(tensor, grad).
            scalar = (tensor * grad).sum()
        self.engine.backward(scalar, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        """Finish the step: sync tied embeddings, clip, update, advance the LR schedule.

        Returns:
            {"grad_norm": global norm before clipping, "lr": the learning rate just used}.
        """
        if self._ctx is None:
            raise RuntimeError("step called without begin_step()")
        if self._backwards != self._num_micro:
            raise RuntimeError(
                f"step after {self._backwards} backward calls, expected {self._num_micro}"
            )
        grad_norm = None
        if self._coalesce:
            self.engine.set_gradient_accumulation_boundary(True)
            self.module.sync_tied_embedding_grads()
            self._ctx.__exit__(None, None, None)
        elif self.zero_stage == 0:
            if self.tied_pipeline:
                self.module.sync_tied_embedding_grads()
            grad_norm = self._clip_stage0()
        self._ctx = None
        lr = self.current_lr()
        self.engine.step()
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        return {"grad_norm": grad_norm, "lr": lr}

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _clip_stage0(self) -> float:
        """Global norm over TP x PP (gradients are already DP-reduced), then clip in place."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.module.parameters():
            if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                continue
            if p.tensor_model_parallel or self.ps.tp_rank == 0:
                total += p.grad.detach().double().pow(2).sum()
        if self.ps.mp_group is not None:
            dist.all_reduce(total, group=self.ps.mp_group)
        norm = float(total.sqrt())
        clip = self.run_cfg.optim.clip_grad
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # -- checkpoint --------------------------------------------------------------------------

    def save_state(self, ckpt_dir: str | Path) -> None:
        """DeepSpeed's own checkpoint (module, ZeRO-partitioned optimizer, LR scheduler) of this
        rank into `<ckpt_dir>/deepspeed/state/`. Collective over the world."""
        self.engine.save_checkpoint(
            str(Path(ckpt_dir) / DS_SUBDIR), tag=DS_TAG, client_state={}, save_latest=False
        )

    def load_state(self, ckpt_dir: str | Path) -> None:
        """Restore what `save_state` wrote (same layout and DP size). Collective."""
        path, _ = self.engine.load_checkpoint(
            str(Path(ckpt_dir) / DS_SUBDIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}/{DS_SUBDIR}/{DS_TAG}: DeepSpeed found no state")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters (TP shards, global names) as CPU tensors; gathers ZeRO-3
        partitions one parameter at a time. Collective over DP at ZeRO 3."""
        out = {}
        for name, p in self.module.named_parameters():
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    out[name] = p.detach().to("cpu", copy=True)
            else:
                out[name] = p.detach().to("cpu", copy=True)
        return out
