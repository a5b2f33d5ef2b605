"""Triton kernels of the log-prob stages (CUDA; on CPU through TRITON_INTERPRET=1 for tests).

Same contract as `logprobs_torch.fwd_stats` / `logprobs_torch.bwd`: logits as a `[B, T, V]` view
with unit stride along V, per-row tensors of N = B * T entries. TRITON_INTERPRET is read when
`@triton.jit` decorates, i.e. when this module is first imported: set it before that.

Each program owns BLOCK_N rows and walks the vocabulary in [BLOCK_N, BLOCK_V] tiles. On a GPU
BLOCK_N is 1 for large V (one row per program, thousands of programs); the interpreter runs each
program in Python, so there it takes many rows per program. Row and column offsets are int64
(N * V exceeds 2^31 at real sizes), and every load and store is masked (the interpreter does not
check bounds).

Numerics: log-space differences are clamped at -200 before exp (exp(-200) is exactly 0 in fp32),
so padded vocabulary columns (finfo.min, or -inf after a temperature < 1) and out-of-range lanes
give exactly zero probability and no 0 * inf NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megarlhf.kernels._dispatch import triton_interpreting

# Globals read inside @triton.jit must be constexpr (triton >= 3 refuses plain globals).
_NEG_CLAMP = tl.constexpr(-200.0)


# Forward: reads N * V * b bytes of logits (b = 2 for bf16/fp16, 4 for fp32) plus 8 N of labels,
# writes 16 N. At B*T = N = 4096, V = 32000: bf16 262 MB -> 87 us on an H100 at ~3 TB/s; fp32
# 524 MB -> 175 us. N = 16384, V = 128256 bf16 (4.2 GB) -> 1.4 ms. Compute is ~6 flops and one
# exp per element, far below the H100's ratio, so the floor is the bandwidth one.
@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    lab_ptr,
    out_ptr,
    N,
    T,
    V,
    stride_b,
    stride_t,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    row_off = (rows // T) * stride_b + (rows % T) * stride_t
    cols0 = tl.arange(0, BLOCK_V).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        ok = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        z = x.to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Shift by 0 while a row has seen only -inf (s and w stay 0 then).
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        dm = tl.maximum(m - m_ref, _NEG_CLAMP)
        scale = tl.exp(dm)
        d = tl.maximum(z - m_ref[:, None], _NEG_CLAMP)
        e = tl.exp(d)
        if WITH_ENTROPY:
            # Moving the reference from m to m_ref: w' = e^dm * (w + dm * s).
            w = scale * (w + dm * s) + tl.sum(e * d, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
    y = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    has = row_ok & (y >= 0) & (y < V)
    xy = tl.load(x_ptr + row_off + tl.where(has, y, 0), mask=has, other=0.0)
    zy = tl.where(has, xy.to(tl.float32) * inv_temp, 0.0)
    tl.store(out_ptr + rows, m, mask=row_ok)
    tl.store(out_ptr + N + rows, s, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, w, mask=row_ok)
    tl.store(out_ptr + 3 * N + rows, zy, mask=row_ok)


# Backward: reads N * V * b bytes of logits and writes N * V * b of gradient (plus 24 N of per-row
# scalars). N = 4096, V = 32000: bf16 524 MB -> 175 us on an H100 at ~3 TB/s; fp32 1.05 GB ->
# 350 us. Bandwidth-bound as the forward.
@triton.jit
def _logprobs_bwd_kernel(
    x_ptr,
    lab_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    grad_ptr,
    N,
    T,
    V,
    stride_b,
    stride_t,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    row_off = (rows // T) * stride_b + (rows % T) * stride_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    active = (g_lp != 0.0) | (g_ent != 0.0)
    a = g_lp + g_ent * ent
    cols0 = tl.arange(0, BLOCK_V).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        ok = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        t = tl.maximum(x.to(tl.float32) * inv_temp - lse[:, None], _NEG_CLAMP)
        p = tl.exp(t)
        g = -inv_temp * p * (a[:, None] + g_ent[:, None] * t)
        g += tl.where(cols[None, :] == y[:, None], inv_temp * g_lp[:, None], 0.0)
        g = tl.where(active[:, None], g, 0.0)
        out = grad_ptr + rows[:, None] * V + cols[None, :]
        tl.store(out, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _tiles(N: int, V: int, block_n: int | None, block_v: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps): ~4k-element tiles on a GPU, ~16k in the interpreter."""
    budget = 16384 if triton_interpreting() else 4096
    bv = block_v or min(_next_pow2(V), 1024 if triton_interpreting() else 4096)
    bn = block_n or max(1, min(_next_pow2(N), budget // bv))
    warps = 8 if bn * bv >= 4096 else 4
    return bn, bv, warps


def fwd_stats(
    x3: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
    block_n: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """`[4, N]` fp32 (m, s, w, zy); see `logprobs_torch.fwd_stats`. block_* override the tiles."""
    B, T, V = x3.shape
    N = B * T
    out = torch.zeros(4, N, dtype=torch.float32, device=x3.device)
    if N == 0:
        return out
    bn, bv, warps = _tiles(N, V, block_n, block_v)
    _logprobs_fwd_kernel[(triton.cdiv(N, bn),)](
        x3,
        labels.contiguous(),
        out,
        N,
        T,
        V,
        x3.stride(0),
        x3.stride(1),
        float(inv_temp),
        WITH_ENTROPY=bool(with_entropy),
        BLOCK_N=bn,
        BLOCK_V=bv,
        num_warps=warps,
    )
    return out


def bwd(
    x3: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor,
    inv_temp: float,
    block_n: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """`[B, T, V]` contiguous gradient in x3's dtype; see `logprobs_torch.bwd`."""
    B, T, V = x3.shape
    N = B * T
    grad = torch.empty((B, T, V), dtype=x3.dtype, device=x3.device)
    if N == 0:
        return grad
    bn, bv, warps = _tiles(N, V, block_n, block_v)
    _logprobs_bwd_kernel[(triton.cdiv(N, bn),)](
        x3,
        labels.contiguous(),
        lse.contiguous(),
        ent.contiguous(),
        g_lp.contiguous(),
        g_ent.contiguous(),
        grad,
        N,
        T,
        V,
        x3.stride(0),
        x3.stride(1),
        float(inv_temp),
        BLOCK_N=bn,
        BLOCK_V=bv,
        num_warps=warps,
    )
    return grad
