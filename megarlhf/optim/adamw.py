"""AdamW for a model stage: parameter groups (what decays) and the implementation to use."""

from __future__ import annotations

import logging

import torch
from torch import nn

from megarlhf.config.optim import OptimConfig

logger = logging.getLogger(__name__)


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


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's FusedAdam on CUDA when `optim.impl=auto` and it loads."""
    kw = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if optim.impl == "auto" and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as e:  # no compiler / CUDA toolkit: fall back, loudly
            logger.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW", e)
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, **kw)
