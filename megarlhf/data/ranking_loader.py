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
from megarlhf.data.sampler import ResumableSampler


class RankingLoader:
    """This rank's micro-batches of prompts for each optimizer step.

    Args:
        samples: all ranking samples (every rank holds all of them).
        pad_id: token id of padding.
        sampler: which prompts each step takes on this rank.
    """

    def __init__(self, samples: Sequence[RankingSample], pad_id: int, sampler: ResumableSampler):
        if sampler.num_rows != len(samples):
            raise ValueError(f"sampler has {sampler.num_rows} prompts, the data {len(samples)}")
        self.samples = samples
        self.pad_id = pad_id
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the epoch the next step belongs to)."""
        return self.sampler.epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's `grad_accum` micro-batches (dicts as in the module docstring)."""
        return [
            collate_rankings([self.samples[i] for i in mb], self.pad_id)
            for mb in self.sampler.next_step()
        ]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
