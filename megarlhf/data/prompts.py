"""PPO inputs: the prompt set and the PTX (pretraining) rows, with their resumable order.

Prompts are any row shape of `formats.py` in any file format of `rows.py` ({"prompt": str} JSONL
most often; a `messages` column, or the prompt part of HH / UltraFeedback / pairwise rows). Every
rank holds the whole (small) tokenized prompt list and draws the same global batch of
`rollout_batch_size` prompts per step (the hybrid engine splits generation over its own layout),
so the order is a `ResumableSampler` seen from one rank holding the whole batch. PTX text is
UTF-8, one document per non-blank line (split on "\n" only, a leading BOM skipped, as for JSON
lines), concatenated (EOS between documents) and cut into rows of `ptx_seq_len` tokens, drawn the
same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megarlhf.config.data import RowsConfig
from megarlhf.data.errors import DataError, Invalid
from megarlhf.data.formats import parse_row, prompt_tokens
from megarlhf.data.rows import decode_utf8, load_rows, read_bytes, split_lines
from megarlhf.data.sampler import ResumableSampler
from megarlhf.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def make_prompt(
    row, tokenizer: Tokenizer, template: str, max_len: int, rows: RowsConfig
) -> list[int]:
    """The generation prompt's token ids of one row (a parsed value); Invalid if it is bad."""
    prompt = parse_row(row, rows.format, rows.fields, "ppo").prompt
    if not (prompt.strip() if isinstance(prompt, str) else prompt):
        raise Invalid("empty_prompt", "the prompt is empty")
    ids = list(prompt_tokens(tokenizer, prompt, template).ids)
    if len(ids) > max_len:
        raise Invalid(
            "too_long",
            f"prompt of {len(ids)} tokens exceeds data.max_prompt_len={max_len} (raise it "
            "together with model.max_seq_len, or shorten the prompt)",
        )
    return ids


def load_prompts(
    files: list[str],
    tokenizer: Tokenizer,
    template: str,
    max_len: int,
    rows: RowsConfig | None = None,
) -> list[list[int]]:
    """Generation prompts (token ids) of every row.

    Args:
        rows: the rows' shape and column names (data.format, data.fields); default: auto.

    Raises:
        DataError: a missing file, a row without a prompt, a prompt longer than `max_len`
            (naming file, line and length), or no prompt at all — before any training work.
    """
    rows = rows or RowsConfig()
    for f in files:
        if not Path(f).exists():
            raise DataError(f, "missing", "data.prompt_files: file does not exist")
    loaded = load_rows(
        files,
        lambda row, where: make_prompt(row, tokenizer, template, max_len, rows),
        skip_invalid=False,
        logger=logger,
        what="PPO prompts",
    )
    if not loaded.items:
        raise DataError(",".join(files), "empty", "data.prompt_files: no prompts")
    return loaded.items


def load_ptx_rows(files: list[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """[rows, seq_len] token ids of the plain-text corpus, documents joined by EOS."""
    ids: list[int] = []
    for f in files:
        if not Path(f).is_file():
            raise DataError(f, "missing", "data.ptx_files: file does not exist")
        for line_no, line in split_lines(read_bytes(f)):
            try:
                text = decode_utf8(line).strip()
            except Invalid as e:
                raise DataError(f"{f}:{line_no}", e.reason, str(e)) from None
            if text:
                ids += tokenizer.encode(text) + [tokenizer.eos_id]
    rows = len(ids) // seq_len
    if rows == 0:
        raise DataError(
            ",".join(files),
            "short",
            f"data.ptx_files: fewer than data.ptx_seq_len={seq_len} tokens",
        )
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def global_batch_sampler(num_items: int, batch: int, seed: int, what: str) -> ResumableSampler:
    """The same `batch` items per step on every rank, a fresh seeded order each epoch.

    Args:
        num_items: prompts (or PTX rows) to draw from.
        batch: items per step over all ranks.
        seed: seed of the per-epoch order.
        what: the config key of the batch size, for the error message.
    """
    if num_items < batch:
        raise DataError(
            what, "short", f"{batch} per step but only {num_items} to draw from (lower {what})"
        )
    return ResumableSampler(num_items, batch, 1, dp_rank=0, dp_size=1, seed=seed)


def next_global_batch(sampler: ResumableSampler) -> list[int]:
    """The next step's item indices (the whole global batch)."""
    (batch,) = sampler.next_step()
    return batch
