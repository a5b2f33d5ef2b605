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

Preference batches (DPO) are ranking batches plus where each completion's response is: a
`PreferenceSample` is a `RankingSample` with the length of the prompt its completions share, and
`collate_preferences` adds the response positions the language-model head scores (see there) and
each completion's index in the dataset. `PreferenceLoader` can carry a per-completion column (the
precomputed reference log-probs), attached to every micro-batch and saved with its state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megarlhf.config.data import RowsConfig
from megarlhf.data.errors import Invalid
from megarlhf.data.formats import parse_row, prompt_tokens
from megarlhf.data.rankings import (
    RankingDataset,
    RankingSample,
    collate_rankings,
    load_ranking_dataset,
    make_ranking,
)
from megarlhf.data.sampler import ResumableSampler, StepLoader, even_split
from megarlhf.data.tokenizer import Tokenizer
from megarlhf.model.generation import right_pad

logger = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- preferences (DPO)


@dataclass(frozen=True)
class PreferenceSample(RankingSample):
    """A ranking sample whose completions share their first `response_start` tokens (the
    formatted prompt); the rest of each completion (response, EOS) is what DPO scores."""

    response_start: int = 0


def make_preference(
    row, where: str, tokenizer: Tokenizer, seq_len: int, template: str, max_k: int,
    rows: RowsConfig,
) -> PreferenceSample:  # fmt: skip
    """`rankings.make_ranking` of one row plus its prompt length; Invalid if it is bad."""
    s = make_ranking(row, where, tokenizer, seq_len, template, max_k, rows)
    prompt = prompt_tokens(tokenizer, parse_row(row, rows.format, rows.fields, "rm").prompt,
                           template).ids  # fmt: skip
    n = len(prompt)
    for i, c in enumerate(s.completions):
        if n < 1 or len(c) <= n or list(c[:n]) != prompt:
            raise Invalid(
                "prompt_prefix",
                f"responses[{i}]: the formatted prompt ({n} tokens) is not a proper prefix of "
                "prompt + response (a chat template that rewrites earlier turns?)",
            )
    return PreferenceSample(s.completions, s.ranks, s.source, n)


def load_preference_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    max_k: int = 9,
    skip_invalid: bool = False,
    rows: RowsConfig | None = None,
) -> RankingDataset:
    """As `rankings.load_ranking_dataset`, with `PreferenceSample`s."""
    return load_ranking_dataset(
        paths, tokenizer, seq_len, template, max_k, skip_invalid, rows,
        make=make_preference, what="preference data",
    )  # fmt: skip


def completion_offsets(samples: Sequence[RankingSample]) -> list[int]:
    """Dataset index of each sample's first completion ([num samples + 1], the last the total)."""
    out = [0]
    for s in samples:
        out.append(out[-1] + len(s.completions))
    return out


def collate_preferences(
    samples: Sequence[PreferenceSample], pad_id: int, first_completion: Sequence[int]
) -> dict[str, torch.Tensor]:
    """`collate_rankings` of the prompts plus what a language-model head scores.

    Args:
        samples: the micro-batch's prompts.
        pad_id: token id of padding.
        first_completion: dataset index of each sample's first completion.
    Returns:
        collate_rankings' dict ([N, S] rows, N = sum K) and
        output_index [T]: flat positions (row * S + t - 1) predicting each response token t;
        labels [T]: the token predicted there; token_seq [T]: its row;
        completion_index [N]: each completion's index in the dataset.
    """
    mb = collate_rankings(samples, pad_id)
    width = mb["input_ids"].shape[1]
    index, labels, seq, ids = [], [], [], []
    row = 0
    for s, first in zip(samples, first_completion, strict=True):
        for j, c in enumerate(s.completions):
            t = torch.arange(s.response_start, len(c))
            index.append(row * width + t - 1)
            labels.append(torch.tensor(c[s.response_start :], dtype=torch.long))
            seq.append(torch.full((len(t),), row, dtype=torch.long))
            ids.append(first + j)
            row += 1
    mb["output_index"] = torch.cat(index)
    mb["labels"] = torch.cat(labels)
    mb["token_seq"] = torch.cat(seq)
    mb["completion_index"] = torch.tensor(ids, dtype=torch.long)
    return mb


class PreferenceLoader(StepLoader):
    """This rank's micro-batches of preference prompts for each optimizer step.

    Args:
        samples: all preference samples (every rank holds all of them).
        pad_id: token id of padding.
        sampler: which prompts each step takes on this rank.
    Attributes:
        reference_logps: None, or [total completions] fp32 attached to every micro-batch as
            `reference_logps` [N] and saved in `state_dict` (the precomputed reference).
    """

    def __init__(self, samples: Sequence[PreferenceSample], pad_id: int, sampler: ResumableSampler):
        super().__init__(sampler, len(samples), "prompts")
        self.samples = samples
        self.pad_id = pad_id
        self.offsets = completion_offsets(samples)
        self.reference_logps: torch.Tensor | None = None

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        mb = collate_preferences(
            [self.samples[i] for i in indices], self.pad_id, [self.offsets[i] for i in indices]
        )
        if self.reference_logps is not None:
            mb["reference_logps"] = self.reference_logps[mb["completion_index"]]
        return mb

    def state_dict(self) -> dict:
        state = self.sampler.state_dict()
        if self.reference_logps is not None:
            state["reference_logps"] = self.reference_logps
        return state

    def load_state_dict(self, state: dict) -> None:
        """The sampler's position, and the reference column when the state has one."""
        self.sampler.load_state_dict(state)
        table = state.get("reference_logps")
        if table is not None:
            if tuple(table.shape) != (self.offsets[-1],):
                raise ValueError(
                    f"saved reference log-probs cover {table.numel()} completions, the data has "
                    f"{self.offsets[-1]}"
                )
            self.reference_logps = table.float()


def preference_batches(
    samples: Sequence[PreferenceSample], pad_id: int, micro_batch_size: int, dp_rank: int,
    dp_size: int,
) -> list[dict]:  # fmt: skip
    """This DP rank's micro-batches of all `samples` (held-out prompts, or one pass over the
    training set), as many on every DP rank; a filler micro-batch is flagged `filler`."""
    offsets = completion_offsets(samples)
    out = []
    for idx, filler in even_split(len(samples), micro_batch_size, dp_rank, dp_size):
        mb = collate_preferences([samples[i] for i in idx], pad_id, [offsets[i] for i in idx])
        mb["filler"] = filler
        out.append(mb)
    return out
