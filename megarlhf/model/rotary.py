"""Rotary position embeddings in the Hugging Face LLaMA ("rotate_half") convention.

The convention pairs dimension i with i + head_dim/2 (not adjacent dims), which is what HF LLaMA
checkpoints are stored for, so converted weights need no permutation.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin tables for the given positions.

    Args:
        position_ids: [batch, seq] integer positions.
    Returns:
        (cos, sin), each [batch, 1, seq, head_dim] in `dtype` (computed in fp32).
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by the tables from `rotary_cos_sin`."""
    return x * cos + _rotate_half(x) * sin
