"""SFT data: rows -> validated, tokenized samples with a loss mask.

A row is any shape of `formats.py` (JSONL, JSON, Parquet, Arrow or a `save_to_disk` folder, read
by `rows.py`): most often `{"prompt": str, "response": str}` or `{"messages": [{"role",
"content"}, ...]}` (roles system/user/assistant; other keys are ignored); preference rows (HH,
UltraFeedback, pairwise, ranking) give their prompt and best-ranked response. Pairs become one user
turn and one assistant turn (or, with `template="raw"`, prompt and response verbatim). Loss is on
response tokens only: every assistant turn's content plus the EOS appended to it; prompts, system
and user turns and template glue are context.

Bad input never passes silently. By default the first bad row raises `DataError` naming the file
and line (`data/x.jsonl:17: sample is 300 tokens, longer than data.seq_len=256`) or row; with
`skip_invalid=True` bad rows are skipped and a count per reason is logged (and returned). Blank
lines are not rows and are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from megarlhf.config.data import RowsConfig
from megarlhf.data.errors import DataError, Invalid
from megarlhf.data.formats import (
    Example,
    check_ranking,
    completion_tokens,
    conversation_tokens,
    parse_row,
)
from megarlhf.data.rows import load_rows
from megarlhf.data.tokenizer import Tokenizer

__all__ = ["DataError", "SFTDataset", "Sample", "load_sft_dataset", "load_sft_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation.

    Attributes:
        input_ids: token ids, [L].
        loss_mask: [L]; loss_mask[t] says token t is a training target (predicted at t-1).
        source: where it came from ("file:line", or "file row i" for columnar files).
    """

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTDataset:
    """Samples in file order, plus what was skipped (only with skip_invalid)."""

    samples: list[Sample]
    # Rows skipped per reason (e.g. {"too_long": 2}).
    skipped: dict[str, int] = field(default_factory=dict)
    # The first skipped row's full message per reason.
    first_skipped: dict[str, str] = field(default_factory=dict)


def demonstration_tokens(ex: Example, tokenizer: Tokenizer, template: str):
    """ChatTokens of a row's demonstration: its conversation, or prompt + best response."""
    if ex.conversation is not None:
        return conversation_tokens(tokenizer, ex.conversation, template)
    if len(ex.responses) > 1:
        check_ranking(ex.responses, ex.ranks, len(ex.responses))
    best = ex.responses[ex.ranks.index(1)]
    return completion_tokens(tokenizer, ex.prompt, best, template)


def make_sample(
    row, where: str, tokenizer: Tokenizer, seq_len: int, template: str, rows: RowsConfig
) -> Sample:
    """Validate and tokenize one row (a parsed value); Invalid if it is bad."""
    ex = parse_row(row, rows.format, rows.fields, "sft")
    toks = demonstration_tokens(ex, tokenizer, template)
    if len(toks.ids) > seq_len:
        raise Invalid(
            "too_long", f"sample is {len(toks.ids)} tokens, longer than data.seq_len={seq_len}"
        )
    return Sample(tuple(toks.ids), tuple(toks.trained), where)


def _load(paths, tokenizer, seq_len, template, skip_invalid, rows) -> SFTDataset:
    rows = rows or RowsConfig()
    loaded = load_rows(
        paths,
        lambda row, where: make_sample(row, where, tokenizer, seq_len, template, rows),
        skip_invalid=skip_invalid,
        logger=logger,
        what="SFT data",
    )
    return SFTDataset(loaded.items, loaded.skipped, loaded.first_skipped)


def load_sft_file(
    path: str,
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    skip_invalid: bool = False,
    rows: RowsConfig | None = None,
) -> SFTDataset:
    """All samples of one file (see the module docstring for the bad-input policy)."""
    return _load([path], tokenizer, seq_len, template, skip_invalid, rows)


def load_sft_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    skip_invalid: bool = False,
    rows: RowsConfig | None = None,
) -> SFTDataset:
    """Samples of all files in order; raises DataError when none is usable.

    Args:
        paths: data files or save_to_disk folders (`rows.py` says which formats).
        rows: the rows' shape and column names (data.format, data.fields); default: auto.
    """
    out = _load(paths, tokenizer, seq_len, template, skip_invalid, rows)
    if not out.samples:
        skipped = sum(out.skipped.values())
        raise DataError(
            ", ".join(paths), "empty", f"no usable samples ({skipped} invalid rows skipped)"
        )
    return out
