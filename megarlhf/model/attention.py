"""Scaled dot-product attention with the fastest correct kernel for the tensors at hand.

Implementations (`model.attention`):
  "sdpa"   torch's `scaled_dot_product_attention` (fused causal path when there is no mask).
  "math"   explicit batched matmuls in the model's dtype with the softmax in fp32:
           scores = (q k^T) / sqrt(d), masked, softmax(fp32), cast, times v.
  "flash"  flash-attn's varlen-free kernel, CUDA half precision, causal, no padding mask.
  "auto"   flash where it applies; on CPU "math" for bf16/fp16 and "sdpa" for fp32; "sdpa" on
           CUDA otherwise.

Why "math" on CPU in bf16: torch 2.13's CPU flash kernel (what SDPA picks for bf16) is about 3x
slower than two bf16 matmuls plus an fp32 softmax at RLHF's sequence lengths (measured: b16 h4
s96 d64 forward + backward 28 ms against 9 ms; docs/bench.md), and slower than its own fp32 path.
In fp32 SDPA's kernel is the faster one, so the exactness tests (fp32) keep it.

Shapes: q [b, hq, s, d], k / v [b, hkv, t, d] with hq a multiple of hkv (grouped-query attention:
each group of hq / hkv query heads shares a key/value head), mask [b or 1, 1, s, t] bool (True =
attend) or None for causal attention whose last query sits at key slot t - 1. Output
[b, hq, s, d] in q's dtype.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "sdpa", "math", "flash")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_FLASH_ATTN = _importable("flash_attn")


def choose(impl: str, q: torch.Tensor, mask: torch.Tensor | None, allow_flash: bool) -> str:
    """The implementation `impl` ("auto" or a name) resolves to for these tensors."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    flash_ok = allow_flash and HAVE_FLASH_ATTN and q.is_cuda and mask is None and half
    if impl == "flash":
        return "flash" if flash_ok else "sdpa"
    if impl != "auto":
        return impl
    if flash_ok:
        return "flash"
    return "math" if (half and not q.is_cuda) else "sdpa"


def attention(q, k, v, mask, dropout_p: float = 0.0, impl: str = "auto", allow_flash=True):
    """Attention of q over k, v (see the module docstring for shapes and implementations)."""
    name = choose(impl, q, mask, allow_flash)
    if name == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal=True
        )
        return out.transpose(1, 2)
    if name == "math":
        return math_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=mask is None and q.shape[2] > 1,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def causal_mask(s: int, t: int, device=None) -> torch.Tensor:
    """[s, t] bool: query i (at key slot t - s + i) attends keys j <= t - s + i."""
    return torch.ones(s, t, dtype=torch.bool, device=device).tril(t - s)


def math_attention(q, k, v, mask, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention as matmuls in q's dtype with an fp32 softmax; the reference is `sdpa`."""
    b, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    # GQA without copying keys: the g query heads of a group become extra query rows.
    qg = q.reshape(b, hkv, g * s, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(b, hkv, g, s, t)
    scores = scores * (1.0 / math.sqrt(d))
    allowed = causal_mask(s, t, q.device) if mask is None else mask.unsqueeze(2)
    if mask is not None or s > 1:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.matmul(probs.view(b, hkv, g * s, t), v)
    return out.view(b, hq, s, d)
