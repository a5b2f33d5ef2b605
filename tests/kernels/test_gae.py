"""GAE backends against a scalar Python loop: holes, all-masked rows, T=1, B=1, left padding,
gamma/lambda edge values, a hand-computed row, and the benchmark's batched loop baseline."""

import pytest
import torch
from megarlhf.kernels import gae
from megarlhf.kernels.gae_ref import gae_loop, gae_python

from tests.kernels.helpers import cpu_backends


def _close(actual, expected):
    """fp32 scan against the fp64 Python loop: 1e-5 relative per element, plus 1e-5 of the
    largest magnitude (with gamma = lam = 1 over T = 300 an advantage is a sum of ~300 deltas and
    fp32 accumulation leaves ~5e-6 absolute error even where the sum crosses 0)."""
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _python(r, v, m, gamma, lam):
    a, ret = gae_python(r.tolist(), v.tolist(), m.bool().tolist(), gamma, lam)
    return torch.tensor(a, dtype=torch.float32), torch.tensor(ret, dtype=torch.float32)


def _masks(B, T):
    """Random holes, a prompt-then-response row, an all-masked row, all-valid, a single token."""
    m = torch.rand(B, T) > 0.3
    if B >= 5:
        start = T // 3
        m[1] = False
        m[1, start : start + max(1, T // 2)] = True
        m[2] = False
        m[3] = True
        m[4] = False
        m[4, T // 2] = True
    return m


def test_hand_computed_row_with_a_hole():
    r = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    v = torch.tensor([[0.5, 0.25, 9.0, 1.0]])
    m = torch.tensor([[True, True, False, True]])
    # t=3: delta = 2 - 1 = 1, A = 1. t=1 (skips the hole, bootstrapped by V[3] = 1):
    # delta = 1 + 0.5 * 1 - 0.25 = 1.25, A = 1.25 + 0.25 * 1 = 1.5.
    # t=0: delta = 0 + 0.5 * 0.25 - 0.5 = -0.375, A = -0.375 + 0.25 * 1.5 = 0.
    adv_expect = torch.tensor([[0.0, 1.5, 0.0, 1.0]])
    ret_expect = torch.tensor([[0.5, 1.75, 0.0, 2.0]])
    for backend in ("torch", None):
        adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, backend=backend)
        torch.testing.assert_close(adv, adv_expect, rtol=0, atol=1e-7)
        torch.testing.assert_close(ret, ret_expect, rtol=0, atol=1e-7)
    adv, ret = _python(r, v, m, 0.5, 0.5)
    torch.testing.assert_close(adv, adv_expect, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (6, 1), (7, 13), (9, 300)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_matches_python_loop(backend, B, T, gamma, lam):
    r, v, m = torch.randn(B, T), torch.randn(B, T), _masks(B, T)
    snapshot = (r.clone(), v.clone(), m.clone())
    adv, ret = gae(r, v, m, gamma, lam, backend=backend)
    e_adv, e_ret = _python(r, v, m, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv, e_adv)
    _close(ret, e_ret)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    for before, after in zip(snapshot, (r, v, m), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", cpu_backends())
def test_input_dtypes_and_all_masked(backend):
    B, T = 8, 40
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = _masks(B, T)
    adv, ret = gae(r.bfloat16(), v.double(), m.float(), 0.97, 0.9, backend=backend)
    e_adv, e_ret = _python(r.bfloat16().float(), v, m, 0.97, 0.9)
    _close(adv, e_adv)
    _close(ret, e_ret)
    zero = gae(r, v, torch.zeros(B, T, dtype=torch.bool), 0.97, 0.9, backend=backend)
    assert all(torch.equal(t, torch.zeros(B, T)) for t in zero)


def test_outputs_are_not_differentiable():
    r, v = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    adv, ret = gae(r, v, torch.ones(2, 5), 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_benchmark_baseline_loop_matches_python():
    B, T = 5, 31
    r, v, m = torch.randn(B, T), torch.randn(B, T), _masks(B, T)
    adv, ret = gae_loop(r, v, m, 0.99, 0.95)
    e_adv, e_ret = _python(r, v, m, 0.99, 0.95)
    _close(adv, e_adv)
    _close(ret, e_ret)
