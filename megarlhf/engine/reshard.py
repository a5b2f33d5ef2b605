"""In-memory re-sharding of model weights between two layouts of the same world (no disk).

The PPO hybrid engine trains the actor in one layout (tp_t, pp_t, dp_t, ZeRO) and generates in
another (tp_g, pipeline size 1, dp_g = world / tp_g). `reshard_weights(src, dst)` copies every
parameter of `src` (built on the source ParallelState) into `dst` (built on the destination one):

  for each parameter name, in the same order on every rank:
    1. the source stage that holds it all-gathers its TP shards into the canonical full tensor
       (unsharded, vocabulary trimmed to the real size);
    2. that stage broadcasts it to the other stages of its pipeline (when pp_src > 1);
    3. every rank cuts its destination shard (vocabulary re-padded for the destination TP).

LoRA: a source with adapters and a destination without (the hybrid engine's generation copy) gets
the merged weights W + (alpha / r) B A: each source TP rank adds its adapter's shard of the update
to its shard of W (both factors' shards multiply into exactly W's shard: B_t A for a
column-parallel W, B A_t for a row-parallel one) before the all-gather, so merging moves no more
bytes than copying. A destination with the same adapters gets them copied like any parameter.

Memory: one full tensor at a time on top of both models. Communication: each rank receives every
parameter once (the simple scheme; a generation layout needs whole layers on every rank anyway).
Values are copied, never recomputed, so a round trip is bitwise lossless.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.model.gpt import (
    GPTModel,
    full_param_shape,
    layer_range,
    lora_sharding_plan,
    stage_param_names,
)
from megarlhf.model.lora import adapter_names, base_config
from megarlhf.parallel.sharding import all_gather_full, shard_tensor

VOCAB_PARAMS = ("embedding.word.weight", "output.weight")


def source_name(name: str, cfg) -> str:
    """The canonical tensor a parameter is read from (a tied output copy reads the embedding)."""
    if name == "output.weight" and cfg.tie_embeddings and cfg.head == "lm":
        return "embedding.word.weight"
    return name


def _owner_stage(name: str, cfg, pp: int) -> int:
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        for stage in range(pp):
            start, end = layer_range(cfg.num_layers, pp, stage)
            if start <= layer < end:
                return stage
    for stage in range(pp):
        if name in stage_param_names(cfg, pp, stage):
            return stage
    raise KeyError(f"no pipeline stage holds {name}")


@torch.no_grad()
def reshard_weights(src: GPTModel, dst: GPTModel) -> None:
    """Copy src's weights into dst; both hold the same model config in any two layouts, or src
    has LoRA adapters and dst is its merged model (`base_config`): dst gets W + (alpha / r) B A.

    Collective over the whole world: every rank calls it with its own src and dst.
    """
    cfg, src_ps, dst_ps = src.cfg, src.ps, dst.ps
    merge = cfg.lora.enabled and not dst.cfg.lora.enabled
    if dst.cfg != (base_config(cfg) if merge else cfg):
        raise ValueError("reshard_weights: source and destination model configs differ")
    src_params = dict(src.named_parameters())
    src_modules = dict(src.named_modules())
    dtype = next(src.parameters()).dtype
    device = next(src.parameters()).device
    wanted: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in dst.named_parameters():
        wanted.setdefault(source_name(name, cfg), []).append((name, p))
    canonical = stage_param_names(cfg, 1, 0)  # every tensor once, no tied copies
    if not merge:
        canonical += list(lora_sharding_plan(cfg, 1))
    for name in canonical:
        stage = _owner_stage(name, cfg, src_ps.pp_size)
        full = None
        if src_ps.pp_rank == stage:
            local = src_params[name].detach()
            if merge and adapter_names(cfg, name) is not None:
                lora = src_modules[name.removesuffix(".weight")].lora
                local = (local.float() + lora.delta_weight()).to(local.dtype)
            full = all_gather_full(local, src.plan[name], src_ps.tp_group)
            if name in VOCAB_PARAMS:
                full = full[: cfg.vocab_size]
        if src_ps.pp_size > 1:
            if full is None:
                full = torch.empty(full_param_shape(cfg, name), dtype=dtype, device=device)
            full = full.contiguous()
            dist.broadcast(full, src=src_ps.pp_ranks[stage], group=src_ps.pp_group)
        for dst_name, p in wanted.get(name, []):
            value = full
            if dst_name in VOCAB_PARAMS:
                value = torch.nn.functional.pad(full, (0, 0, 0, dst.padded_vocab - cfg.vocab_size))
            p.copy_(shard_tensor(value, dst.plan[dst_name], dst_ps.tp_rank))
