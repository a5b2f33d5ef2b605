"""Reward-model batches: ranking samples -> resumable per-rank micro-batches of whole prompts.

A training micro-batch is `micro_batch_size` prompts with all their completions (collated by
`rankings.collate_rankings`: `input_ids` / `attention_mask` [sum K, S] right-padded to the longest
completion of the micro-batch, `ranks` [sum K], `group_sizes` [prompts]). The prompt order of each
epoch and each rank's slice of the global batch come from `ResumableSampler` (a "row" there is a
prompt here), so a checkpoint continues at exactly the next prompt.

Evaluation and scoring sets are split over data-parallel ranks with `sampler.even_split`: every
rank gets the same number of micro-batches (ZeRO-3 gathers parameters in every forward,
collectively over DP, so one rank forwarding less would hang the others); a rank with nothing left
forwards a copy of item 0 flagged `filler`, whose results are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megarlhf.data.rankings import RankingSample, collate_rankings
from megarlhf.data.sampler import ResumableSampler, StepLoader, even_split
from megarlhf.model.generation import right_pad


class RankingLoader(StepLoader):
    """This rank's micro-batches of prompts for each optimizer step.

    Args:
        samples: all ranking samples (every rank holds all of them).
        pad_id: token id of padding.
        sampler: which prompts each step takes on this rank.
    """

    def __init__(self, samples: Sequence[RankingSample], pad_id: int, sampler: ResumableSampler):
        super().__init__(sampler, len(samples), "prompts")
        self.samples = samples
        self.pad_id = pad_id

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The micro-batch dict (as in the module docstring) of the given prompts."""
        return collate_rankings([self.samples[i] for i in indices], self.pad_id)


def ranking_eval_batches(
    samples: Sequence[RankingSample], pad_id: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict]:
    """This DP rank's micro-batches of held-out prompts (as many on every DP rank; a filler
    micro-batch is flagged `filler`)."""
    out = []
    for idx, filler in even_split(len(samples), micro_batch_size, dp_rank, dp_size):
        mb = collate_rankings([samples[i] for i in idx], pad_id)
        mb["filler"] = filler
        out.append(mb)
    return out


def sequence_batches(
    seqs: Sequence[Sequence[int]], pad_id: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict]:
    """This DP rank's micro-batches of token sequences to score: input_ids / attention_mask
    [n, longest] right-padded, `filler` as above."""
    out = []
    for idx, filler in even_split(len(seqs), micro_batch_size, dp_rank, dp_size):
        ids, mask = right_pad([seqs[i] for i in idx], pad_id)
        out.append({"input_ids": ids, "attention_mask": mask, "filler": filler})
    return out
