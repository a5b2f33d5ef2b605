"""Shared model configs and helpers for model tests."""

import torch

from megarlhf.config import ModelConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.sharding import unshard_tensors
from megarlhf.parallel.state import single_process_state


def tiny_config(family: str, **kw) -> ModelConfig:
    base = dict(
        family=family,
        vocab_size=1003,  # not a multiple of anything useful
        hidden_size=64,
        num_layers=3,
        num_heads=8,
        num_kv_heads=4 if family == "llama" else 0,
        ffn_hidden_size=96 if family == "llama" else 0,
        max_seq_len=64,
        tie_embeddings=family == "gpt2",
        make_vocab_size_divisible_by=8,
    )
    base.update(kw)
    return ModelConfig(**base)


def reference_model(cfg: ModelConfig, seed: int = 7) -> GPTModel:
    """Single-process (TP=1, PP=1) model: the independent reference for parallel runs."""
    return GPTModel(cfg, single_process_state(), seed=seed)


def gather_full(shard: torch.Tensor, group, spec) -> torch.Tensor:
    """All-gather a TP shard (possibly uneven along spec.dim) and rebuild the full tensor."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [spec.local_size(r) for r in range(world)]
    shape = list(shard.shape)
    bufs = []
    for s in sizes:
        shape[spec.dim] = s
        bufs.append(shard.new_empty(shape))
    # all_gather needs equal sizes: pad to the largest, then trim.
    big = max(sizes)
    pad_shape = list(shard.shape)
    pad_shape[spec.dim] = big
    padded = shard.new_zeros(pad_shape)
    padded.narrow(spec.dim, 0, shard.shape[spec.dim]).copy_(shard)
    outs = [shard.new_empty(pad_shape) for _ in sizes]
    dist.all_gather(outs, padded.contiguous(), group=group)
    parts = [o.narrow(spec.dim, 0, s) for o, s in zip(outs, sizes, strict=True)]
    return unshard_tensors(parts, spec)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
