"""`DeepSpeedModel`: a GPT stage driven by DeepSpeed (ZeRO data parallelism) in our TP x PP layout.

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
* Frozen parameters (LoRA: the base). The optimizer DeepSpeed wraps holds the trainable ones only
  (`param_groups`), so ZeRO partitions, fp32 masters and gradient buckets exist for the adapters
  alone. Its checkpoint excludes frozen parameters (`exclude_frozen_parameters`; the base is
  reloaded from where it came from, checkpoint/lora_shards.py) and loads non-strictly. ZeRO 3
  would partition the frozen base as well; it is refused with LoRA (the adapters' states are
  small enough for ZeRO 1/2, and the frozen weights' copies then stay plain tensors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megarlhf.config import ConfigError
from megarlhf.config.optim import DeepSpeedConfig, OptimConfig, check_supported
from megarlhf.optim.adamw import build_optimizer, param_groups
from megarlhf.optim.schedule import build_scheduler
from megarlhf.parallel.state import ParallelState, global_rank_of, group_timeout

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
        self._dp = ps.dp_group if dp > 1 else _singleton_group(rank, ps)
        self._tp = ps.tp_group if tp > 1 else _singleton_group(rank, ps)
        self._pp = ps.pp_group if pp > 1 else _singleton_group(rank, ps)
        self._mp = ps.mp_group if tp * pp > 1 else _singleton_group(rank, ps)

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


def _singleton_group(rank: int, ps: ParallelState):
    # Only the member has to call new_group with local synchronization, so size-1 groups cost
    # nothing on the other ranks. A group of one never waits on a peer, but it takes the layout's
    # timeout anyway: no group of a run is left at torch's 30-minute default.
    return dist.new_group(
        [rank],
        timeout=group_timeout(ps.timeout_s),
        use_local_synchronization=True,
        group_desc=f"singleton group of rank {rank}",
    )


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


def deepspeed_config(
    *,
    optim: OptimConfig,
    deepspeed: DeepSpeedConfig,
    bf16: bool,
    micro_batch_size: int,
    grad_accum: int,
    dp_size: int,
) -> dict:
    """The DeepSpeed config dict of one trained model (batch sizes, ZeRO, precision, clipping).

    DeepSpeed only books the batch shape; our schedule decides what a micro-batch is.
    """
    stage = deepspeed.zero_stage
    zero: dict = {
        "stage": stage,
        "overlap_comm": deepspeed.overlap_comm,
        "contiguous_gradients": deepspeed.contiguous_gradients,
        "reduce_bucket_size": deepspeed.reduce_bucket_size,
    }
    if stage in (1, 2):
        zero["allgather_bucket_size"] = deepspeed.allgather_bucket_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        # Stage 0 is clipped by us (DeepSpeed's fp32 path miscounts pipeline stages).
        "gradient_clipping": optim.clip_grad if stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


# ----------------------------------------------------------------------------- the wrapper


class DeepSpeedModel:
    """One rank's model stage under DeepSpeed, stepping one global batch at a time.

    Usage per optimizer step (every rank):

        model.begin_step(num_micro_batches)
        ...  # for each micro-batch: model(...) forward, then model.backward(loss or out, grad)
        stats = model.step()   # {"grad_norm", "lr"}

    `model.backward` matches the pipeline schedule's `backward_fn(tensor, grad)` contract.

    Args:
        model: this rank's GPTModel stage (weights already initialized or loaded); its config
            gives the precision (model.dtype bf16: DeepSpeed's bf16 mode, fp32 master weights).
        ps: the layout.
        optim: optimizer, schedule and clipping.
        deepspeed: ZeRO stage and communication settings.
        micro_batch_size, grad_accum: the batch shape DeepSpeed books.
        total_steps: optimizer steps of the whole run (sizes the cosine decay).
    """

    def __init__(
        self,
        model: nn.Module,
        ps: ParallelState,
        *,
        optim: OptimConfig,
        deepspeed: DeepSpeedConfig,
        micro_batch_size: int,
        grad_accum: int,
        total_steps: int,
    ):
        import deepspeed as ds

        mcfg = model.cfg
        check_supported(deepspeed.zero_stage, ps.pp_size, mcfg.dtype)
        # LoRA: the base is frozen; DeepSpeed sees, and saves, only what trains.
        self.has_frozen = any(not p.requires_grad for p in model.parameters())
        if self.has_frozen and deepspeed.zero_stage == 3:
            raise ConfigError(
                "deepspeed.zero_stage: 3 is not supported with frozen parameters (model.lora); "
                "use ZeRO 1 or 2, which partition the adapters' optimizer states"
            )
        self.ps, self.optim_cfg = ps, optim
        self.zero_stage = deepspeed.zero_stage
        mark_parallel_parameters(model)
        if self.zero_stage == 3 and mcfg.tie_embeddings and model.post_process:
            # The output layer reads the embedding weight outside its owning module's forward.
            ds.zero.register_external_parameter(model, model.embedding.word.weight)
        head_lr = optim.lr * optim.head_lr_scale if optim.head_lr_scale != 1.0 else None
        groups = param_groups(model, optim.weight_decay, head_lr=head_lr)
        optimizer = build_optimizer(groups, optim, mcfg.dtype)
        scheduler = build_scheduler(optimizer, optim, total_steps)
        self.mpu = DeepSpeedMPU(ps)
        config = deepspeed_config(
            optim=optim,
            deepspeed=deepspeed,
            bf16=mcfg.dtype == "bf16",
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            dp_size=ps.dp_size,
        )
        self.ds, self.optimizer, _, self.scheduler = ds.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            mpu=self.mpu,
            config=config,
            dist_init_required=False,
        )
        self.tied_pipeline = bool(mcfg.tie_embeddings and ps.pp_size > 1)
        self._coalesce = self.tied_pipeline and self.zero_stage in (1, 2)
        self._ctx = None
        self._num_micro = 0
        self._backwards = 0

    # -- forward / backward -------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The model DeepSpeed wraps (the pipeline schedule reads its config through this)."""
        return self.ds.module

    @property
    def device(self) -> torch.device:
        """Where DeepSpeed put the model (the rank's accelerator, or the CPU)."""
        return torch.device(getattr(self.ds, "device", None) or "cpu")

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def begin_step(self, num_micro_batches: int) -> None:
        """Start accumulating one optimizer step of `num_micro_batches` backward calls."""
        if self._ctx is not None:
            raise RuntimeError("begin_step called twice without step()")
        self._num_micro, self._backwards = num_micro_batches, 0
        if self._coalesce:
            # The block restores on exit the boundary flag it found on entry, and step() must
            # then see a boundary.
            self.ds.set_gradient_accumulation_boundary(True)
            self._ctx = self.ds.coalesce_grad_reduction()
            self._ctx.__enter__()
        else:
            self._ctx = True
        self.ds.set_gradient_accumulation_boundary(num_micro_batches == 1)

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Backward of one micro-batch: (loss, None) on the last stage, (output, grad) elsewhere.

        The loss must already be normalized for the whole global batch (see module docstring).
        """
        if self._ctx is None:
            raise RuntimeError("backward called outside begin_step()/step()")
        self._backwards += 1
        if self._backwards > self._num_micro:
            raise RuntimeError(f"more backward calls than the {self._num_micro} micro-batches")
        self.ds.set_gradient_accumulation_boundary(self._backwards == self._num_micro)
        if grad is None:
            # Undo DeepSpeed's average over DP: our loss wants the sum.
            scalar = tensor * self.ps.dp_size
        else:
            # Same parameter gradients as torch.autograd.backward(tensor, grad).
            scalar = (tensor * grad).sum()
        self.ds.backward(scalar, scale_wrt_gas=False)

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
            self.ds.set_gradient_accumulation_boundary(True)
            self.module.sync_tied_embedding_grads()
            self._ctx.__exit__(None, None, None)
        elif self.zero_stage == 0:
            if self.tied_pipeline:
                self.module.sync_tied_embedding_grads()
            grad_norm = self._clip_stage0()
        self._ctx = None
        lr = self.current_lr()
        self.ds.step()
        if grad_norm is None:
            norm = self.ds.get_global_grad_norm()
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
        clip = self.optim_cfg.clip_grad
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # -- checkpoint --------------------------------------------------------------------------

    def save_state(self, ckpt_dir: str | Path) -> None:
        """DeepSpeed's own checkpoint (module, ZeRO-partitioned optimizer, LR scheduler) of this
        rank into `<ckpt_dir>/deepspeed/state/`; frozen parameters are left out. Collective over
        the world."""
        self.ds.save_checkpoint(
            str(Path(ckpt_dir) / DS_SUBDIR),
            tag=DS_TAG,
            client_state={},
            save_latest=False,
            exclude_frozen_parameters=self.has_frozen,
        )

    def load_state(self, ckpt_dir: str | Path) -> None:
        """Restore what `save_state` wrote (same layout and DP size); frozen parameters are not
        in it (the caller restores them first). Collective."""
        path, _ = self.ds.load_checkpoint(
            str(Path(ckpt_dir) / DS_SUBDIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.has_frozen,
        )
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}/{DS_SUBDIR}/{DS_TAG}: DeepSpeed found no state")

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """This rank's parameters (TP shards, global names) as CPU tensors; gathers ZeRO-3
        partitions one parameter at a time. Collective over DP at ZeRO 3.

        trainable_only: only those that train (LoRA: the adapters, what its checkpoint holds)."""
        out = {}
        for name, p in self.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    out[name] = p.detach().to("cpu", copy=True)
            else:
                out[name] = p.detach().to("cpu", copy=True)
        return out


@torch.no_grad()
def add_to_parameter(param: torch.Tensor, delta: float) -> None:
    """param += delta on this rank, DeepSpeed-aware (e.g. shifting a reward head's bias).

    The optimizer's fp32 master copy (ZeRO 1/2/3) moves by the same delta, so the next step does
    not undo the shift. ZeRO-3: the parameter is gathered, shifted and re-partitioned (every DP
    rank computed the same value; DP rank 0's is kept), and each rank shifts the real elements of
    its fp32 partition. Collective over the DP group under ZeRO.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        import deepspeed
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.add_(delta)
        # DeepSpeed's set_full_hp_param mis-slices a parameter smaller than the DP size (a
        # 1-element bias over 2 ranks): shift the local partition, padding excluded, instead.
        local = safe_get_local_fp32_param(param).clone()
        start = dist.get_rank(group=param.ds_process_group) * local.numel()
        valid = min(max(param.ds_numel - start, 0), local.numel())
        local[:valid] += delta
        safe_set_local_fp32_param(param, local)
        return
    param.add_(delta)
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2 (and DeepSpeed's bf16 optimizer)
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(param, safe_get_full_fp32_param(param) + delta)


@torch.no_grad()
def edit_parameter(param: torch.Tensor, edit) -> None:
    """Apply `edit(tensor)` (in place) to a parameter and to the optimizer's fp32 master copy of
    it (ZeRO 1/2, DeepSpeed's bf16 optimizer), so the next step keeps the edit. Not for ZeRO-3
    partitioned parameters (see `add_to_parameter`)."""
    if hasattr(param, "ds_id"):
        raise ValueError("edit_parameter: ZeRO-3 partitions the parameter; gather it first")
    edit(param)
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            edit(master)
            safe_set_full_fp32_param(param, master)
