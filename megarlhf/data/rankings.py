"""Reward-model data: K-way rankings and pairwise comparisons.

Two row formats (JSONL, one per line):

    {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   K = len(responses), 2..9
    {"prompt": str, "chosen": str, "rejected": str}                   a K = 2 ranking

`ranking[i]` is the rank of `responses[i]` among the prompt's responses: 1 = best, K = worst, so
`ranking` is a permutation of 1..K. Each completion is tokenized as the prompt/response pair of the
SFT stage (same template, EOS appended) and scored at its last token.

Rejected with an error naming file and line: K < 2 or K > max_k, a ranking that is not a permutation
of 1..K, ties (two responses sharing a rank), duplicate responses, empty responses, a completion
longer than the context, malformed JSON and missing or mistyped fields. With `skip_invalid=True`
such rows are skipped and counted per reason instead (logged, and returned).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megarlhf.data.sft import DataError, _check_type, _Invalid
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


def _responses_and_ranks(row: dict, max_k: int) -> tuple[list[str], list[int]]:
    _check_type(row, dict, "row")
    if "prompt" not in row:
        raise _Invalid("missing_field", "missing field 'prompt'")
    _check_type(row["prompt"], str, "field 'prompt'")
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _Invalid("missing_field", f"pairwise row has no {key!r}")
            _check_type(row[key], str, f"field {key!r}")
        responses, ranks = [row["chosen"], row["rejected"]], [1, 2]
    else:
        for key in ("responses", "ranking"):
            if key not in row:
                raise _Invalid(
                    "missing_field",
                    f"missing field {key!r} (a row needs 'responses' and 'ranking', or "
                    "'chosen' and 'rejected')",
                )
            _check_type(row[key], list, f"field {key!r}")
        responses, ranks = row["responses"], row["ranking"]
        for i, r in enumerate(responses):
            _check_type(r, str, f"responses[{i}]")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise _Invalid("wrong_type", f"ranking must be a list of integers, got {ranks!r}")
    _check_ranking(responses, ranks, max_k)
    return responses, ranks


def _check_ranking(responses: list[str], ranks: list[int], max_k: int) -> None:
    k = len(responses)
    if k < 2:
        raise _Invalid("too_few_responses", f"needs at least 2 responses to compare, got {k}")
    if k > max_k:
        raise _Invalid("too_many_responses", f"{k} responses exceed data.max_k={max_k}")
    if len(ranks) != k:
        raise _Invalid("bad_ranking", f"ranking has {len(ranks)} entries for {k} responses")
    for i, r in enumerate(responses):
        if not r.strip():
            raise _Invalid("empty_response", f"responses[{i}] is empty")
    first: dict[int, int] = {}
    for i, r in enumerate(ranks):
        if r in first:
            raise _Invalid(
                "tie",
                f"responses[{first[r]}] and responses[{i}] are tied at rank {r}; ties are not "
                "supported (break the tie or drop one response)",
            )
        first[r] = i
    if sorted(ranks) != list(range(1, k + 1)):
        raise _Invalid("bad_ranking", f"ranking {ranks} is not a permutation of 1..{k}")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r in seen:
            raise _Invalid(
                "duplicate_response", f"responses[{seen[r]}] and responses[{i}] are identical"
            )
        seen[r] = i


def parse_ranking_line(
    line: bytes, tokenizer: Tokenizer, seq_len: int, template: str, max_k: int, source: str
) -> RankingSample:
    """Parse, validate and tokenize one JSONL line; raise DataError naming `source` if bad."""
    try:
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Invalid("not_utf8", f"not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise _Invalid(
                "malformed_json", f"malformed JSON: {e.msg} (column {e.colno})"
            ) from None
        responses, ranks = _responses_and_ranks(row, max_k)
        completions = []
        for i, response in enumerate(responses):
            ids = tokenizer.tokenize_pair(row["prompt"], response, template=template).ids
            if len(ids) > seq_len:
                raise _Invalid(
                    "too_long",
                    f"prompt + responses[{i}] is {len(ids)} tokens, longer than "
                    f"data.seq_len={seq_len}",
                )
            completions.append(tuple(ids))
    except _Invalid as e:
        raise DataError(source, e.reason, str(e)) from None
    return RankingSample(tuple(completions), tuple(ranks), source)


def load_ranking_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    max_k: int = 9,
    skip_invalid: bool = False,
) -> RankingDataset:
    """All ranking rows of the files, in order (see the module docstring for bad input)."""
    out = RankingDataset([])
    for path in paths:
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as e:
            raise DataError(path, "unreadable", f"cannot read data file ({e.strerror})") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                out.samples.append(
                    parse_ranking_line(line, tokenizer, seq_len, template, max_k, source)
                )
            except DataError as e:
                if not skip_invalid:
                    raise
                out.skipped[e.reason] = out.skipped.get(e.reason, 0) + 1
                logger.warning("skipping %s", e)
    if not out.samples:
        raise DataError(", ".join(paths), "empty", "no usable ranking rows")
    return out


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
