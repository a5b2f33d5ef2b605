"""PPO inputs: the prompt set (JSONL) and the PTX (pretraining) rows, with their resumable order.

Every rank holds the whole (small) tokenized prompt list and draws the same global batch of
`rollout_batch_size` prompts per step (the hybrid engine splits generation over its own layout),
so the order is a `ResumableSampler` seen from one rank holding the whole batch. PTX text is
concatenated (EOS between documents) and cut into rows of `ptx_seq_len` tokens, drawn the same
way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megarlhf.data.sampler import ResumableSampler
from megarlhf.data.sft import DataError
from megarlhf.data.tokenizer import Tokenizer


def load_prompts(
    files: list[str], tokenizer: Tokenizer, template: str, max_len: int
) -> list[list[int]]:
    """Generation prompts (token ids) of every row's "prompt".

    Raises:
        DataError: a missing file, a row without a prompt, a prompt longer than `max_len`
            (naming file, line and length), or no prompt at all — before any training work.
    """
    out = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(f, "missing", "data.prompt_files: file does not exist")
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{line_no}", "json", f"not JSON ({e})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{f}:{line_no}", "no_prompt", 'no non-empty "prompt" string')
            ids = list(tokenizer.tokenize_pair(prompt, template=template).ids)
            if len(ids) > max_len:
                raise DataError(
                    f"{f}:{line_no}",
                    "too_long",
                    f"prompt of {len(ids)} tokens exceeds data.max_prompt_len="
                    f"{max_len} (raise it together with model.max_seq_len, or shorten the prompt)",
                )
            out.append(ids)
    if not out:
        raise DataError(",".join(files), "empty", "data.prompt_files: no prompts")
    return out


def load_ptx_rows(files: list[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """[rows, seq_len] token ids of the plain-text corpus, documents joined by EOS."""
    ids: list[int] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(f, "missing", "data.ptx_files: file does not exist")
        for line in path.read_text().splitlines():
            if line.strip():
                ids += tokenizer.encode(line.strip()) + [tokenizer.eos_id]
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
