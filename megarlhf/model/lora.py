"""LoRA at run time: the base model with its adapters off, merged weights, and the names a LoRA
model trains.

The adapters themselves are `megarlhf.parallel.layers.LoRAAdapter` modules on the block's linears
(built by `GPTModel` from `model.lora`, laid out by `gpt.lora_sharding_plan`). This module adds:

- `adapters_disabled(model)`: a context manager in which the model computes its frozen base
  alone. Under LoRA the PPO / DPO reference model is exactly that (the initial policy is the base,
  since B starts at 0), so no second copy of the weights is kept: `AdaptersOffReference` is the
  reference role over the trained model, with FrozenModel's `use()` interface.
- merging: `merge_full` gives W + (alpha / r) B A for full tensors (the hybrid engine's
  generation copy, exports); `LoRAAdapter.delta_weight()` the same for a rank's shard.
- `base_config(cfg)`: the config of the merged model (no adapters), and `trainable_names`.

Why generation in place applies the adapters in the forward instead of merging them into the
actor's weights for the rollout and unmerging after: W + s B A - s B A is not W in bf16 (nor
bitwise in fp32), so every rollout would move the frozen base a little, and the reference (the
base with adapters off) and a bitwise resume would drift with it; merging exactly would need a
saved copy of every adapted W. The forward costs 2 r (in + out) extra FLOPs per token and
linear against 2 in out, under 2% of the matmuls at r = 8, h = 576.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from megarlhf.config import ModelConfig
from megarlhf.config.model import LoRAConfig
from megarlhf.model.gpt import (
    LORA_LINEARS,
    adapted_weight,
    is_adapter,
    layer_range,
    lora_sharding_plan,
    lora_trainable,
)
from megarlhf.parallel.layers import LoRAAdapter

__all__ = [
    "AdaptersOffReference",
    "adapted_weight",
    "adapters_disabled",
    "base_config",
    "has_adapters",
    "is_adapter",
    "merge_full",
    "trainable_names",
]


def lora_modules(model: nn.Module) -> list[LoRAAdapter]:
    """Every adapter of `model` (a GPTModel stage, or anything holding one)."""
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_modules(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base inside the body: every adapter off, restored on exit (errors
    included). No weight is copied or changed, so the base computed here is bitwise the model
    built without adapters. A model without adapters is yielded unchanged.

    Collectives: none of its own; the forward's TP collectives are the base model's.
    """
    mods = lora_modules(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(mods, before, strict=True):
            m.enabled = was


class AdaptersOffReference:
    """The frozen reference model of PPO / DPO under LoRA: the trained model itself with its
    adapters off (its base, which is the initial policy), so no second copy of the weights.

    The same interface as `megarlhf.engine.offload.FrozenModel`: `use()` yields the module to run
    forward-only (in eval mode, adapters off; both restored after). Call it under
    `torch.no_grad()`, as the reference passes are.

    Args:
        model: the trained stage (a DeepSpeedModel's `.module`, a GPTModel with adapters).
    """

    def __init__(self, model: nn.Module):
        if not has_adapters(model):
            raise ValueError("AdaptersOffReference: the model has no LoRA adapters")
        self.model = model

    @contextlib.contextmanager
    def use(self) -> Iterator[nn.Module]:
        was_training = self.model.training
        self.model.train(False)
        try:
            with adapters_disabled(self.model):
                yield self.model
        finally:
            self.model.train(was_training)


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The model config without adapters: the shape of the merged model (and of the base)."""
    if not cfg.lora.enabled:
        return cfg
    return dataclasses.replace(cfg, lora=LoRAConfig())


@torch.no_grad()
def merge_full(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + scale * B A for full (or matching shard) tensors W [out, in], A [r, in], B [out, r],
    computed in fp32 and returned in W's dtype."""
    delta = (b.float() @ a.float()) * scale
    return (weight.float() + delta).to(weight.dtype)


def adapter_names(cfg: ModelConfig, weight: str) -> tuple[str, str] | None:
    """(A, B) names of the adapter on base weight `weight`, or None where it has none."""
    if not (cfg.lora.enabled and weight.startswith("layers.") and weight.endswith(".weight")):
        return None
    linear = weight.split(".", 2)[2].removesuffix(".weight")
    target = next((t for t, name in LORA_LINEARS.items() if name == linear), None)
    if target not in cfg.lora.target_modules:
        return None
    stem = weight.removesuffix(".weight")
    return f"{stem}.lora.a", f"{stem}.lora.b"


def trainable_names(cfg: ModelConfig, pp: int, pp_rank: int) -> list[str]:
    """Names of the parameters pipeline stage `pp_rank` trains under LoRA, in model order: its
    layers' adapters, then (scalar head, last stage) the head. Empty without model.lora."""
    if not cfg.lora.enabled:
        return []
    start, end = layer_range(cfg.num_layers, pp, pp_rank)
    names = [n for n in lora_sharding_plan(cfg, 1) if start <= int(n.split(".")[1]) < end]
    if cfg.head == "scalar" and pp_rank == pp - 1:
        names += [n for n in ("head.weight", "head.bias") if lora_trainable(cfg, n)]
    return names
