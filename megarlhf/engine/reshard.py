"""In-memory re-sharding of model weights between two layouts of the same world (no disk).

The PPO hybrid engine trains the actor in one layout (tp_t, pp_t, dp_t, ZeRO) and generates in
another (tp_g, pipeline size 1, dp_g = world / tp_g). `reshard_weights(src, dst)` copies every
parameter of `src` (built on the source ParallelState) into `dst` (built on the destination one):

  for each parameter name, in the same order on every rank:
    1. the source stage that holds it all-gathers its TP shards into the canonical full tensor
       (unsharded, vocabulary trimmed to the real size);
    2. that stage broadcasts it to the other stages of its pipeline (when pp_src > 1);
    3. every rank cuts its destination shard (vocabulary re-padded for the destination TP).

Memory: one full tensor at a time on top of both models. Communication: each rank receives every
parameter once (the simple scheme; a generation layout needs whole layers on every rank anyway).
Values are copied, never recomputed, so a round trip is bitwise lossless.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.model.gpt import GPTModel, full_param_shape, stage_param_names
from megarlhf.parallel.sharding import all_gather_full, shard_tensor

VOCAB_PARAMS = ("embedding.word.weight", "output.weight")


def source_name(name: str, cfg) -> str:
    """The canonical tensor a parameter is read from (a tied output copy reads the embedding)."""
    if name == "output.weight" and cfg.tie_embeddings and cfg.head == "lm":
        return "embedding.word.weight"
    return name


def _owner_stage(name: str, cfg, pp: int) -> int:
    for stage in range(pp):
        if name in stage_param_names(cfg, pp, stage):
            return stage
    raise KeyError(f"no pipeline stage holds {name}")


@torch.no_grad()
def reshard_weights(src: GPTModel, dst: GPTModel) -> None:
    """Copy src's weights into dst; both hold the same model config in any two layouts.

    Collective over the whole world: every rank calls it with its own src and dst.
    """
    cfg, src_ps, dst_ps = src.cfg, src.ps, dst.ps
    if src.cfg != dst.cfg:
        raise ValueError("reshard_weights: source and destination model configs differ")
    src_params = dict(src.named_parameters())
    dtype = next(src.parameters()).dtype
    device = next(src.parameters()).device
    wanted: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in dst.named_parameters():
        wanted.setdefault(source_name(name, cfg), []).append((name, p))
    canonical = stage_param_names(cfg, 1, 0)  # every tensor once, no tied copies
    for name in canonical:
        stage = _owner_stage(name, cfg, src_ps.pp_size)
        full = None
        if src_ps.pp_rank == stage:
            full = all_gather_full(src_params[name].detach(), src.plan[name], src_ps.tp_group)
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
