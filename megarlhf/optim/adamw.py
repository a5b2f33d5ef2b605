"""AdamW for a model stage: parameter groups (what decays) and the implementation to use."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from megarlhf.config.optim import OptimConfig

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: matrices decay, vectors (biases, norm weights)
    do not; with `head_lr`, a scalar head's parameters (`head.*` of a `head: scalar` model) form
    their own groups at that learning rate (the scheduler scales every group's rate alike).

    Only parameters with requires_grad enter: under LoRA (model.lora.rank > 0) the frozen base is
    never handed to the optimizer, so neither Adam nor DeepSpeed (ZeRO partitions, fp32 master
    copies, gradient buckets) holds any state for it: the LoRA factors (matrices, decayed as
    PEFT's trainers do) and a scalar head are all it sees.

    Embedding matrices decay too (Megatron's default); their zero padding rows stay zero because
    decoupled decay and Adam both leave a zero parameter with zero gradient at zero.
    """
    cfg = getattr(model, "cfg", None)
    split_head = head_lr is not None and getattr(cfg, "head", None) == "scalar"
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_head = split_head and name.startswith("head.")
            buckets.setdefault((is_head, p.dim() >= 2), []).append(p)
    if not buckets:
        raise ValueError("param_groups: the model has no trainable parameter")
    groups = []
    for is_head in (False, True):
        for decays in (True, False):
            params = buckets.get((is_head, decays))
            if params or (not is_head and decays):
                group = {"params": params or [], "weight_decay": weight_decay if decays else 0.0}
                if is_head:
                    group["lr"] = head_lr
                groups.append(group)
    return groups


def build_optimizer(
    groups: list[dict], optim: OptimConfig, dtype: str = "fp32"
) -> torch.optim.Optimizer:
    """The AdamW of `optim.impl` (see OptimConfig) for a model computing in `dtype`.

    All are decoupled-weight-decay Adam over the same groups; they differ in the order of their
    floating-point operations (tests/optim: equal to 1e-6 over several steps), and in speed.
    """
    kw = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    impl = optim.impl
    if impl == "auto" and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as e:  # no compiler / CUDA toolkit: fall back, loudly
            logger.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW", e)
            return torch.optim.AdamW(groups, fused=True, **kw)
    if impl == "auto":
        impl = "fused" if dtype == "bf16" else "torch"
    if impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        _query_cpu_once()
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=impl == "fused", **kw)


def _query_cpu_once() -> None:
    """Make py-cpuinfo's `get_cpu_info` answer once per process.

    DeepSpeed's op builder asks it for the compile flags every time it loads cpu_adam, cached
    build or not (three calls per optimizer), and each call starts a Python subprocess: 1.1 s
    apiece here, 3.3 s of every cpu_adam run's start-up and 6.7 s of PPO's (actor and critic).
    The answer (architecture, flags) cannot change within a process, so it is cached.
    """
    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
