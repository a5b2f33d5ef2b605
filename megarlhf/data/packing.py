"""Packing samples into fixed-length rows, and collating rows into the batch dict.

Batch contract (every tensor [B, S], torch.long, S = data.seq_len):

* `input_ids`: the tokens; padding positions hold the tokenizer's pad id.
* `labels`: already shifted targets: labels[b, t] is the token the model must predict at
  position t, i.e. input_ids[b, t+1] when that token belongs to the same sample and is trained,
  else -100 (prompt tokens, the last token of every sample, padding).
* `position_ids`: position of each token within its own sample, restarting at 0 per sample
  (0 on padding).
* `segment_ids`: 1, 2, ... numbers the samples of a row left to right; 0 is padding.

A model attends from query q to key k only if segment_ids[q] == segment_ids[k] and k <= q, with
position_ids as positions. Each sample then sees exactly what it would see alone, so the summed
token loss (and its gradient) of a packed batch equals that of the same samples unpacked. Padding
forms segment 0, attending only to earlier padding (never empty, so no NaN) and seen by no sample;
its labels are -100. The loss is normalized per target token (sum / count of labels != -100).

Packing is greedy first-fit over a seeded shuffle of the samples: each sample goes into the first
row with room for it, opening a new row when none has. A max-segment-tree over the rows' free space
finds that row in O(log n), so packing n samples costs O(n log n).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class _SampleLike(Protocol):
    input_ids: Sequence[int]
    loss_mask: Sequence[bool]


def first_fit_pack(lengths: Sequence[int], seq_len: int, seed: int) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most `seq_len`.

    Args:
        lengths: token count of each sample, all in [1, seq_len].
        seq_len: row length S.
        seed: seed of the shuffle that fixes the order in which samples are placed.

    Returns:
        rows[r] = indices of the samples in row r, in placement order (left to right).
    """
    n = len(lengths)
    bad = [i for i, n_tok in enumerate(lengths) if not 0 < n_tok <= seq_len]
    if bad:
        raise ValueError(f"sample {bad[0]} has length {lengths[bad[0]]}, not in [1, {seq_len}]")
    size = 1
    while size < max(n, 1):
        size *= 2
    # tree[size + r] = free space of row r (all rows start empty); tree[i] = max of children.
    tree = [seq_len] * (2 * size)
    rows: list[list[int]] = []
    for i in np.random.default_rng(seed).permutation(n).tolist():
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost row with free space >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def collate_rows(
    rows: Sequence[Sequence[_SampleLike]], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch dict (module docstring) of `rows`, each a list of samples laid out left to right.

    Args:
        rows: B rows; the samples of a row must total at most `seq_len` tokens.
        seq_len: S.
        pad_id: token id of padding positions.

    Returns:
        {"input_ids", "labels", "position_ids", "segment_ids"}, each [B, S] torch.long.
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    segment_ids = np.zeros((b, seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        off = 0
        for k, s in enumerate(row, 1):
            ids = np.asarray(s.input_ids, dtype=np.int64)
            n = len(ids)
            if off + n > seq_len:
                raise ValueError(f"row {r} holds more than seq_len={seq_len} tokens")
            input_ids[r, off : off + n] = ids
            trained = np.asarray(s.loss_mask, dtype=bool)[1:]
            labels[r, off : off + n - 1] = np.where(trained, ids[1:], IGNORE_INDEX)
            position_ids[r, off : off + n] = np.arange(n)
            segment_ids[r, off : off + n] = k
            off += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
    }


def collate_unpacked(
    samples: Sequence[_SampleLike], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded sample per row; the same fields as `collate_rows`."""
    return collate_rows([[s] for s in samples], seq_len, pad_id)
