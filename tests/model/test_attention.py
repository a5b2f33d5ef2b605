"""The attention implementations against an fp64 reference: the explicit "math" path (what CPU
bf16 runs) and SDPA, on awkward shapes (grouped-query heads, odd lengths, left padding, a KV-cache
offset, single-token decode), outputs and gradients, in fp32 and bf16, fresh inputs each time."""

from __future__ import annotations

import pytest
import torch

from megarlhf.model.attention import attention, causal_mask, choose


def _reference(q, k, v, mask):
    """fp64 loop-free reference: repeat kv heads, masked softmax."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s, t = q.shape[2], k.shape[2]
    allowed = causal_mask(s, t) if mask is None else mask
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _padded_mask(b, s, t, pad):
    """Left padding of `pad[i]` keys in row i, causal with the queries at the last s slots."""
    key_valid = torch.arange(t)[None, :] >= torch.tensor(pad)[:, None]
    m = causal_mask(s, t)[None] & key_valid[:, None, :]
    own = torch.arange(t)[None, :] == (torch.arange(s) + t - s)[:, None]
    m = m | own[None]  # every query attends itself (a padded query has a finite row)
    return m[:, None]


CASES = [
    # b, hq, hkv, s, t, padded
    (2, 4, 4, 7, 7, False),  # plain causal
    (3, 6, 2, 5, 5, True),  # GQA, left padding
    (2, 9, 3, 1, 13, True),  # decode step with padding, SmolLM2's 9 / 3 heads
    (2, 4, 1, 1, 9, False),  # decode step, no mask (MQA)
    (1, 2, 2, 3, 11, False),  # KV-cache offset: 3 new queries after 8 cached keys
]


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_fp64_reference_with_gradients(impl, dtype, tol, case):
    b, hq, hkv, s, t, padded = case
    q = torch.randn(b, hq, s, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, t, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, t, 16, dtype=dtype, requires_grad=True)
    mask = _padded_mask(b, s, t, [i % 3 for i in range(b)]) if padded else None
    if mask is None and s > 1 and s != t:
        mask = causal_mask(s, t)[None, None]  # SDPA's is_causal assumes s == t
    out = attention(q, k, v, mask, impl=impl)
    assert out.dtype == dtype and out.shape == (b, hq, s, 16)
    grad = torch.randn_like(out)
    out.backward(grad)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(qr, kr, vr, mask)
    ref.backward(grad.double())
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol * max(scale, 1.0)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        err = (got.double() - want).abs().max().item()
        assert err <= 4 * tol * max(want.abs().max().item(), 1.0), (impl, err)


def test_auto_choice():
    bf = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    assert choose("auto", bf, None, allow_flash=True) == "math"  # CPU bf16: the fast path here
    assert choose("auto", bf.float(), None, allow_flash=True) == "sdpa"  # fp32: SDPA's kernel
    assert choose("sdpa", bf, None, allow_flash=True) == "sdpa"
