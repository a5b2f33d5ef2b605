"""Shared model configs and helpers for model tests."""

import torch

from megarlhf.config import ModelConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.sharding import all_gather_full
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
    return all_gather_full(shard, spec, group)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
