"""AdamW for a model stage: parameter groups (what decays) and the implementation to use."""

from __future__ import annotations

import logging

import torch
from torch import nn

from megarlhf.config.optim import OptimConfig

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: matrices decay, vectors (biases, norm
    weights) do not.

    Only parameters with requires_grad enter: under LoRA (model.lora.rank > 0) the frozen base is
    never handed to the optimizer, so neither Adam nor DeepSpeed (ZeRO partitions, fp32 master
    copies, gradient buckets) holds any state for it: the LoRA factors (matrices, decayed as
    PEFT's trainers do) and a scalar head are all it sees.

    Embedding matrices decay too (Megatron's default); their zero padding rows stay zero because
    decoupled decay and Adam both leave a zero parameter with zero gradient at zero.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("param_groups: the model has no trainable parameter")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
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

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=impl == "fused", **kw)
