"""Reward-model data: K-way rankings and pairwise comparisons.

Row shapes (see `formats.py`; any file format of `rows.py`):

    {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   K = len(responses), 2..9
    {"prompt": str, "chosen": str, "rejected": str}                   a K = 2 ranking

and the public preference shapes, each a K = 2 ranking: Anthropic HH-RLHF transcripts
({"chosen", "rejected"}, their shared turns the prompt) and chat-message pairs
(UltraFeedback-binarized: {"chosen": [messages], "rejected": [messages]}).

`ranking[i]` is the rank of `responses[i]` among the prompt's responses: 1 = best, K = worst, so
`ranking` is a permutation of 1..K. Each completion is tokenized as the prompt/response pair of the
SFT stage (same template, EOS appended; a conversation prompt with the response as its next
assistant turn) and scored at its last token: the EOS that ends the response, where PPO reads
the reward of a sampled response (a template's text after the EOS, e.g. ChatML's newline, is cut:
`chat.through_last_trained`).

Rejected with an error naming file and line (or row): K < 2 or K > max_k, a ranking that is not a
permutation of 1..K, ties (two responses sharing a rank), duplicate responses, empty responses, a
completion longer than the context, malformed JSON and missing or mistyped fields. With
`skip_invalid=True` such rows are skipped and counted per reason instead (logged per file and in
total, and returned).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megarlhf.config.data import RowsConfig
from megarlhf.data.chat import through_last_trained
from megarlhf.data.errors import DataError, Invalid
from megarlhf.data.formats import RM_FORMATS, check_ranking, completion_tokens, parse_row
from megarlhf.data.rows import load_rows
from megarlhf.data.tokenizer import Tokenizer
from megarlhf.model.generation import right_pad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankingSample:
    """One prompt's K tokenized completions and their ranks (1 = best)."""

    completions: tuple[tuple[int, ...], ...]
    ranks: tuple[int, ...]
    source: str


@dataclass
class RankingDataset:
    samples: list[RankingSample]
    # Rows skipped per reason (only with skip_invalid).
    skipped: dict[str, int] = field(default_factory=dict)
    # The first skipped row's full message per reason.
    first_skipped: dict[str, str] = field(default_factory=dict)


def make_ranking(
    row, where: str, tokenizer: Tokenizer, seq_len: int, template: str, max_k: int,
    rows: RowsConfig,
) -> RankingSample:  # fmt: skip
    """Validate and tokenize one row (a parsed value); Invalid if it is bad."""
    ex = parse_row(row, rows.format, rows.fields, "rm")
    check_ranking(ex.responses, ex.ranks, max_k)
    completions = []
    for i, response in enumerate(ex.responses):
        tokens = completion_tokens(tokenizer, ex.prompt, response, template)
        ids = through_last_trained(tokens.ids, tokens.trained)
        if len(ids) > seq_len:
            raise Invalid(
                "too_long",
                f"prompt + responses[{i}] is {len(ids)} tokens, longer than data.seq_len={seq_len}",
            )
        completions.append(tuple(ids))
    return RankingSample(tuple(completions), ex.ranks, where)


def load_ranking_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    max_k: int = 9,
    skip_invalid: bool = False,
    rows: RowsConfig | None = None,
    make=None,
    what: str = "RM data",
) -> RankingDataset:
    """All ranking rows of the files, in order (see the module docstring for bad input).

    Args:
        rows: the rows' shape and column names (data.format, data.fields); default: auto.
        make: builds one sample, `make(row, where, tokenizer, seq_len, template, max_k, rows)`
            (default `make_ranking`; DPO's loader passes its `make_preference`).
        what: the data's name in the skipped-rows summary.
    """
    rows, make = rows or RowsConfig(), make or make_ranking
    if rows.format not in RM_FORMATS:
        raise ValueError(f"data.format={rows.format} has no responses to rank ({RM_FORMATS})")
    loaded = load_rows(
        paths,
        lambda row, where: make(row, where, tokenizer, seq_len, template, max_k, rows),
        skip_invalid=skip_invalid,
        logger=logger,
        what=what,
    )
    if not loaded.items:
        raise DataError(", ".join(paths), "empty", "no usable ranking rows")
    return RankingDataset(loaded.items, loaded.skipped, loaded.first_skipped)


def collate_rankings(samples: Sequence[RankingSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompts as one right-padded batch of all their completions.

    Returns:
        input_ids [N, S] and attention_mask [N, S] with N = sum of K over the prompts, completions
        laid out prompt after prompt; ranks [N]; group_sizes [num_prompts].
    """
    flat = [c for s in samples for c in s.completions]
    ids, mask = right_pad(flat, pad_id)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "ranks": torch.tensor([r for s in samples for r in s.ranks], dtype=torch.long),
        "group_sizes": torch.tensor([len(s.completions) for s in samples], dtype=torch.long),
    }
