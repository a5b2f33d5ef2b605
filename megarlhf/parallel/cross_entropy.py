"""Vocab-parallel cross-entropy: per-token loss from a vocabulary shard of the logits, without
gathering the vocabulary.

A thin layer over `megarlhf.kernels.logprobs_from_logits`, which computes the label log-prob in
stages (local max -> all-reduce MAX -> local sum-exp and target logit -> one packed all-reduce
SUM; see kernels/logprobs.py): the loss is its negation. The backward needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megarlhf.kernels import logprobs_from_logits


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy `-log softmax(logits)[label]`.

    Args:
        logits: `[..., V_local]` this rank's contiguous vocabulary shard (rank r holds ids
            [r * V_local, (r + 1) * V_local)); fp32, bf16 or fp16. Not modified.
        labels: `[...]` global vocabulary ids; `ignore_index` marks positions without a loss.
        tp_group: the TP group the vocabulary is sharded over (None: not sharded).
        ignore_index: label value to skip.

    Returns:
        `[...]` fp32 loss, 0 (and no gradient) where labels == ignore_index; differentiable
        w.r.t. logits.
    """
    logp = logprobs_from_logits(logits, labels, tp_group=tp_group, ignore_index=ignore_index)
    return torch.neg(logp)
