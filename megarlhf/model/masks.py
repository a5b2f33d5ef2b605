"""Attention masks: causal, left/right padding, packed samples, and KV-cache offsets in one rule.

Query i (absolute slot `offset + i` in the key sequence) may attend key j when
    j <= offset + i  and  key_valid[j]  and  segment[j] == segment[offset + i]
and always attends itself, so a padding query never has an empty row (its output is ignored, but an
all-masked softmax row would be NaN and poison gradients through 0 * NaN).
"""

from __future__ import annotations

import torch


def build_attention_mask(
    q_len: int,
    key_valid: torch.Tensor | None,
    segment_ids: torch.Tensor | None = None,
    offset: int = 0,
    k_len: int | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean mask [batch or 1, 1, q_len, k_len] (True = attend), or None for plain causal.

    Args:
        q_len: number of new query positions.
        key_valid: [batch, k_len] bool, False for padding keys; None if every key is valid.
        segment_ids: [batch, k_len] int sample index per key slot (packed sequences); None: one.
        offset: slot of the first query in the key sequence (KV-cache length before this call).
        k_len: key length (defaults to offset + q_len).
    Returns:
        None when the mask is exactly causal without offset (callers use the fused causal path),
        or when one query at the last slot sees every key (a decode step without padding).
    """
    k_len = offset + q_len if k_len is None else k_len
    if key_valid is None and segment_ids is None and k_len == offset + q_len:
        if offset == 0 or q_len == 1:
            return None
    if key_valid is not None:
        device = key_valid.device
    elif segment_ids is not None:
        device = segment_ids.device
    q_slot = torch.arange(q_len, device=device) + offset
    k_slot = torch.arange(k_len, device=device)
    mask = (k_slot[None, :] <= q_slot[:, None])[None]  # [1, q, k]
    if key_valid is not None:
        mask = mask & key_valid[:, None, :k_len].bool()
    if segment_ids is not None:
        seg_q = segment_ids[:, offset : offset + q_len]
        mask = mask & (seg_q[:, :, None] == segment_ids[:, None, :k_len])
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
    return mask.unsqueeze(1)


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | None = None):
    """Position ids [batch, seq] for left-padded rows: count of valid tokens before each slot.

    Padding slots get position 0 (they are never attended by valid queries).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp_min(0).masked_fill(attention_mask == 0, 0)
