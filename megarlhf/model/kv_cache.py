"""Pre-allocated key/value cache for incremental decoding on this rank's heads.

Memory: 2 * layers * batch * kv_heads_local * max_len * head_dim * bytes(dtype).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every local layer, plus which key slots are valid (not padding).

    Args:
        num_layers: layers held by this rank (pipeline stage).
        batch, kv_heads, max_len, head_dim: cache shape per layer.
    """

    def __init__(self, num_layers, batch, kv_heads, max_len, head_dim, dtype, device=None):
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled by completed forward calls
        # Whether any reserved slot is padding; while not, attention needs no key mask (decode
        # steps then take SDPA's mask-free path, about twice as fast on CPU).
        self.padded = False

    def reserve(self, new: int, valid: torch.Tensor | None) -> None:
        """Mark slots [length, length + new) valid per `valid` [batch, new] (before the layers)."""
        if self.length + new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {new} > {self.max_len} slots")
        end = self.length + new
        self.key_valid[:, self.length : end] = True if valid is None else valid.bool()
        if valid is not None and not self.padded:
            self.padded = not bool(valid.all())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v [batch, kv_heads, new, head_dim] for `layer`; return all so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, new: int) -> None:
        self.length += new

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (a compaction when generation drops finished rows)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.key_valid = self.key_valid[rows]
        self.padded = not bool(self.key_valid[:, : self.length].all())
