"""Packed sequences, bf16, and the attention fallback path of the GPT model."""

import pytest
import torch

from megarlhf.model.gpt import padded_vocab_size
from tests.model.common import reference_model, rel_err, tiny_config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_rows_equal_samples_alone(family):
    cfg = tiny_config(family)
    model = reference_model(cfg)
    a = torch.randint(0, cfg.vocab_size, (1, 7))
    b = torch.randint(0, cfg.vocab_size, (1, 5))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # 3 padding slots
    segment_ids = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    position_ids = torch.tensor([list(range(7)) + list(range(5)) + [0] * 3])
    out = model(packed, position_ids=position_ids, segment_ids=segment_ids)
    assert rel_err(out[0, :7], model(a)[0]) <= 1e-5
    assert rel_err(out[0, 7:12], model(b)[0]) <= 1e-5
    assert torch.isfinite(out).all()  # padding rows attend themselves, never NaN


def test_bf16_forward_close_to_fp32():
    cfg32, cfg16 = tiny_config("llama"), tiny_config("llama", dtype="bf16")
    m32, m16 = reference_model(cfg32), reference_model(cfg16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, cfg32.vocab_size, (2, 12))
    out16 = m16(ids)
    assert out16.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: a few percent of the logit scale after 3 layers.
    v = cfg32.vocab_size
    assert rel_err(out16[..., :v], m32(ids)[..., :v]) <= 5e-2
    out16.float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters())


def test_padded_vocab_columns_have_zero_probability():
    cfg = tiny_config("gpt2")
    assert padded_vocab_size(1003, 8, 1) == 1008 and padded_vocab_size(1003, 8, 4) == 1024
    logits = reference_model(cfg)(torch.tensor([[1, 2, 3]]))
    probs = logits.float().softmax(-1)
    assert logits.shape[-1] == 1008
    assert (probs[..., 1003:] == 0).all()


def test_attention_falls_back_to_sdpa_without_flash_attn():
    from megarlhf.model import attention as attn

    q = torch.randn(2, 4, 6, 8)
    k = v = torch.randn(2, 2, 6, 8)
    assert attn.choose("flash", q, None, allow_flash=True) == "sdpa"  # CPU: no flash-attn
    out = attn.attention(q, k, v, None, 0.0, impl="flash")
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(out, scores.softmax(-1) @ vv, atol=1e-5)
