"""Reward normalization (InstructGPT): shift the reward model's bias so that the mean reward over
a set of demonstrations (prompt + labeler-written response) is 0.

The pairwise ranking loss depends only on reward differences, so it has zero gradient with respect
to `head.bias` and leaves the reward's offset arbitrary; PPO, which adds the reward to a KL
penalty, wants it anchored. After training the mean is measured over the demonstration files
(each sequence scored at its last token, the EOS appended to the response, exactly as ranking
completions are) and subtracted from `head.bias`. The bias is part of the model, so every later
use of the checkpoint (inference, the PPO critic's initialization) sees the normalized reward.

Every rank ends with the same shift: the mean is summed over DP replicas on the last stage and
all-reduced over the whole world, and each rank holding the head (every TP rank of the last stage,
every DP replica) subtracts it. Under DeepSpeed ZeRO the optimizer's fp32 master copy of the bias
is shifted too, so a run that continues from the normalized checkpoint starts from the same bias.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megarlhf.algos.ranking import last_token_scores
from megarlhf.data.sampler import even_split
from megarlhf.data.sft import load_sft_dataset
from megarlhf.data.tokenizer import Tokenizer
from megarlhf.model.generation import right_pad
from megarlhf.parallel.pipeline import get_forward_backward_func
from megarlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def collate_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask [n, longest] of token sequences, right-padded."""
    ids, mask = right_pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def demonstration_batches(
    files: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str,
    micro_batch_size: int,
    ps: ParallelState,
    skip_invalid: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the demonstrations (SFT-format files), as sequences.

    Every DP rank gets the same number of micro-batches (`even_split`); a filler micro-batch
    carries `filler=True` and is not counted.
    """
    data = load_sft_dataset(files, tokenizer, seq_len, template, skip_invalid)
    seqs = [s.input_ids for s in data.samples]
    out = []
    for idx, filler in even_split(len(seqs), micro_batch_size, ps.dp_rank, ps.dp_size):
        mb = collate_sequences([seqs[i] for i in idx], tokenizer.pad_id)
        mb["filler"] = filler
        out.append(mb)
    return out


def score_fn(scores: torch.Tensor, mb: dict) -> tuple[None, dict]:
    """Forward-only loss_fn: each sequence's reward at its last token (output 0), fp32 [n]."""
    rewards = last_token_scores(scores[..., 0], mb["attention_mask"]).float()
    if mb.get("filler"):
        rewards = rewards[:0]
    return None, {"rewards": rewards}


@torch.no_grad()
def demonstration_reward_mean(
    model, batches: list[dict], ps: ParallelState, schedule: str = "1f1b"
) -> float:
    """Mean reward over the demonstrations of all DP ranks; the same float on every rank.

    Args:
        model: this rank's GPTModel stage (scalar head), or a wrapper exposing it as `.module`.
        batches: this DP rank's `demonstration_batches` (the same on every rank of the replica).
        ps: the layout.
        schedule: pipeline schedule.
    """
    was_training = _stage(model).training
    model.train(False)  # no dropout while scoring
    try:
        stats = get_forward_backward_func(ps, schedule)(
            model=model, micro_batches=batches, loss_fn=score_fn, ps=ps, forward_only=True
        )
    finally:
        model.train(was_training)
    t = torch.zeros(2, dtype=torch.float64)
    if ps.is_last_stage and ps.tp_rank == 0:
        for s in stats:
            t[0] += s["rewards"].double().sum()
            t[1] += s["rewards"].numel()
    if ps.world_size > 1:
        dist.all_reduce(t)
    if t[1] == 0:
        raise ValueError("no demonstrations to normalize the reward over")
    return float(t[0] / t[1])


def _stage(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def shift_head_bias(model, delta: float) -> None:
    """head.bias += delta on this rank (no-op off the last stage), DeepSpeed-aware.

    The optimizer's fp32 master copy (ZeRO 1/2/3) moves by the same delta, so the next step (of
    a run continued from the normalized checkpoint) does not undo the shift. ZeRO-3: the bias is
    gathered, shifted and re-partitioned (every DP rank computed the same value; DP rank 0's is
    kept), and each rank shifts the real elements of its fp32 partition. Collective over the DP
    group under ZeRO.
    """
    stage = _stage(model)
    if not getattr(stage, "post_process", False):
        return
    bias = stage.head.bias
    if hasattr(bias, "ds_id"):  # ZeRO-3 partitioned parameter
        import deepspeed
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        with deepspeed.zero.GatheredParameters([bias], modifier_rank=0):
            bias.add_(delta)
        # DeepSpeed's set_full_hp_param mis-slices a parameter smaller than the DP size (the
        # 1-element bias over 2 ranks): shift the local partition, padding excluded, instead.
        local = safe_get_local_fp32_param(bias).clone()
        start = dist.get_rank(group=bias.ds_process_group) * local.numel()
        valid = min(max(bias.ds_numel - start, 0), local.numel())
        local[:valid] += delta
        safe_set_local_fp32_param(bias, local)
        return
    bias.add_(delta)
    if hasattr(bias, "_hp_mapping"):  # ZeRO 1/2 (and DeepSpeed's bf16 optimizer)
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(bias, safe_get_full_fp32_param(bias) + delta)


def normalize_reward_bias(
    model, batches: list[dict], ps: ParallelState, schedule: str = "1f1b"
) -> float:
    """Make the mean reward over `batches` 0 by subtracting it from head.bias on every rank.

    Works on a plain GPTModel stage (standalone) or a TrainEngine (inside training). Collective
    over the world.

    Returns:
        the mean reward before the shift (what was subtracted).
    """
    mean = demonstration_reward_mean(model, batches, ps, schedule)
    shift_head_bias(model, -mean)
    logger.info("reward normalization: demonstration mean %.6f subtracted from head.bias", mean)
    return mean
