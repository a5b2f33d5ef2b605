"""Pure-torch backend of the log-prob kernels: the same local stages as the C++ and Triton kernels,
computed on chunks of rows so that no fp32 tensor of the full [rows, V] size is ever allocated.

It is the fallback for devices without a faster backend (no compiler on CPU, no Triton on CUDA).
A chunk holds max(_CHUNK_BYTES, 1/_MAX_CHUNKS of the rows) of fp32 logits, and a few temporaries
of the same size live at once: the extra memory is ~4 chunks, at most ~1/16 of an fp32 copy of the
logits for large inputs. The cap on the number of chunks bounds the number of torch ops (~12 per
chunk), each an OpenMP parallel region that ends in a barrier: on an oversubscribed CPU those
barriers spin while a descheduled thread catches up, and this path was measured 10-30x slower than
on a quiet one (the single-region C++ kernel is not affected).

Both functions take logits as a `[B, T, V]` view with unit stride along V (see
`logprobs.rows_view`) and per-row tensors of `B * T` entries.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_CHUNK_BYTES = 2 << 20  # smallest chunk: fits in L3 next to its temporaries
_MAX_CHUNKS = 64


def _row_chunks(x3: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row index, [rows, V] view) covering all B * T rows in order."""
    B, T, V = x3.shape
    step = max(1, _CHUNK_BYTES // (4 * max(V, 1)), -(-B * T // _MAX_CHUNKS))
    if B == 1 or x3.stride(0) == T * x3.stride(1):  # rows are uniformly strided: one 2D view
        x2 = x3.as_strided((B * T, V), (x3.stride(1), 1), x3.storage_offset())
        for n0 in range(0, B * T, step):
            yield n0, x2[n0 : n0 + step]
    else:
        for b in range(B):
            for t0 in range(0, T, step):
                yield b * T + t0, x3[b, t0 : t0 + step]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fwd_stats(
    x3: torch.Tensor, labels: torch.Tensor, inv_temp: float, with_entropy: bool
) -> torch.Tensor:
    """Local statistics per row of z = x * inv_temp.

    Args:
        x3: logits `[B, T, V]`, unit stride along V.
        labels: `[B * T]` int64 index into this shard's V, or -1 when the label is elsewhere.
        inv_temp: 1 / temperature.
        with_entropy: also compute w (else it is 0).

    Returns:
        `[4, B * T]` fp32: m = max z, s = sum exp(z - m), w = sum exp(z - m) * (z - m),
        zy = z[label] (0 where labels is -1).
    """
    B, T, V = x3.shape
    N = B * T
    out = torch.zeros(4, N, dtype=torch.float32, device=x3.device)
    has = labels >= 0
    for n0, xc in _row_chunks(x3):
        rows = xc.shape[0]
        z = xc.to(_compute_dtype(xc.dtype)) * inv_temp
        m = z.amax(dim=-1)
        # A row of only -inf columns (a padded shard at temperature < 1) contributes s = w = 0.
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        d = z.sub_(m_safe[:, None])
        e = d.exp()
        out[0, n0 : n0 + rows] = m
        out[1, n0 : n0 + rows] = e.sum(dim=-1)
        if with_entropy:
            # exp(-inf) * -inf would be NaN: padded columns contribute exactly 0.
            out[2, n0 : n0 + rows] = torch.where(e > 0, e * d, 0.0).sum(dim=-1)
        lab = labels[n0 : n0 + rows]
        zy = xc.gather(1, lab.clamp(min=0)[:, None])[:, 0].to(z.dtype) * inv_temp
        out[3, n0 : n0 + rows] = torch.where(has[n0 : n0 + rows], zy, 0.0)
    return out


def bwd(
    x3: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor,
    inv_temp: float,
) -> torch.Tensor:
    """Gradient w.r.t. the logits of sum(g_lp * logp + g_ent * entropy).

    With t = z - lse and p = exp(t): inv_temp * (g_lp * [v == y] - p * (g_lp + g_ent * (H + t))).

    Args:
        x3, labels, inv_temp: as in `fwd_stats`.
        lse, ent: `[B * T]` fp32 global log-sum-exp and entropy of each row.
        g_lp, g_ent: `[B * T]` fp32 incoming gradients (0 on ignored rows).

    Returns:
        `[B, T, V]` contiguous, dtype of x3.
    """
    B, T, V = x3.shape
    grad = torch.empty((B, T, V), dtype=x3.dtype, device=x3.device)
    g2 = grad.view(B * T, V)
    for n0, xc in _row_chunks(x3):
        rows = xc.shape[0]
        sl = slice(n0, n0 + rows)
        cd = _compute_dtype(xc.dtype)
        t = xc.to(cd) * inv_temp - lse[sl, None].to(cd)
        p = t.exp()
        a = (g_lp[sl] + g_ent[sl] * ent[sl]).to(cd)
        coef = a[:, None] + g_ent[sl, None].to(cd) * torch.where(p > 0, t, 0.0)
        gc = p.mul_(coef).mul_(-inv_temp)
        lab = labels[sl]
        g_hit = torch.where(lab >= 0, inv_temp * g_lp[sl], 0.0).to(cd)
        gc.scatter_add_(1, lab.clamp(min=0)[:, None], g_hit[:, None])
        active = ((g_lp[sl] != 0) | (g_ent[sl] != 0))[:, None]
        g2[sl] = torch.where(active, gc, 0.0).to(x3.dtype)
    return grad
