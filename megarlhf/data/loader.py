"""The SFT loader: tokenized samples -> rows -> resumable per-rank micro-batch dicts.

Every rank reads and tokenizes all files (cheap at SFT sizes; no rank has to ship data to
another), packs them into the same rows (the packing shuffle is seeded), and takes its own slice of
every global batch through `ResumableSampler`. Its `state_dict()` is the sampler's, which is all a
checkpoint needs to continue at exactly the next row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megarlhf.config.data import DataConfig
from megarlhf.data.packing import collate_rows, first_fit_pack
from megarlhf.data.sampler import ResumableSampler, StepLoader
from megarlhf.data.sft import Sample, SFTDataset, load_sft_dataset
from megarlhf.data.tokenizer import Tokenizer


class SFTLoader(StepLoader):
    """Micro-batch dicts (see `packing.py` for the contract) for each optimizer step of one rank.

    Args:
        samples: all tokenized samples.
        rows: rows[r] = indices into `samples` laid out left to right in row r.
        seq_len: S, the length of every row.
        pad_id: token id of padding.
        sampler: which rows each step takes on this rank.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        rows: Sequence[Sequence[int]],
        seq_len: int,
        pad_id: int,
        sampler: ResumableSampler,
    ):
        super().__init__(sampler, len(rows), "rows")
        self.samples = samples
        self.rows = rows
        self.seq_len = seq_len
        self.pad_id = pad_id

    def collate(self, row_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch dict of the given rows, [len(row_indices), seq_len] each."""
        rows = [[self.samples[i] for i in self.rows[r]] for r in row_indices]
        return collate_rows(rows, self.seq_len, self.pad_id)


def build_rows(dataset: SFTDataset, seq_len: int, pack: bool, seed: int) -> list[list[int]]:
    """Packed rows (first-fit over a seeded shuffle) or one sample per row."""
    if pack:
        return first_fit_pack([len(s) for s in dataset.samples], seq_len, seed)
    return [[i] for i in range(len(dataset.samples))]


def build_sft_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    micro_batch_size: int,
    grad_accum: int,
    dp_rank: int,
    dp_size: int,
) -> SFTLoader:
    """Read, validate, tokenize and pack `cfg.train_files`; a loader for this data-parallel rank."""
    dataset = load_sft_dataset(
        cfg.train_files, tokenizer, cfg.seq_len, cfg.text.template, cfg.skip_invalid, cfg.rows
    )
    rows = build_rows(dataset, cfg.seq_len, cfg.pack, cfg.seed)
    sampler = ResumableSampler(len(rows), micro_batch_size, grad_accum, dp_rank, dp_size, cfg.seed)
    return SFTLoader(dataset.samples, rows, cfg.seq_len, tokenizer.pad_id, sampler)
