"""KL estimators k1, k2, k3 against fp64 formulas, their expectations, clamping and gradients."""

import math

import pytest
import torch
from megarlhf.kernels import k1, k2, k3, kl_penalty


def test_estimators_match_fp64_formulas():
    logp = torch.randn(64, 33) * 2 - 3
    ref = logp + torch.randn(64, 33) * torch.logspace(-6, 0.5, 33)  # tiny to large log-ratios
    log_r = (ref - logp).double()
    torch.testing.assert_close(k1(logp, ref).double(), -log_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k2(logp, ref).double(), log_r**2 / 2, rtol=1e-5, atol=1e-12)
    # k3 is ~(log r)^2 / 2 for small log r: relative accuracy must hold there too (no cancellation)
    torch.testing.assert_close(
        k3(logp, ref).double(), torch.expm1(log_r) - log_r, rtol=1e-5, atol=1e-12
    )
    assert (k2(logp, ref) >= 0).all() and (k3(logp, ref) >= 0).all()
    for name, fn in (("k1", k1), ("k2", k2), ("k3", k3)):
        assert torch.equal(kl_penalty(logp, ref, name), fn(logp, ref))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    """Sample x ~ q; E[k1] = E[k3] = KL(q || p) (to Monte-Carlo error); k2 is biased but close."""
    q = torch.distributions.Categorical(logits=torch.randn(50))
    p = torch.distributions.Categorical(logits=q.logits + 0.3 * torch.randn(50))
    x = q.sample((400_000,))
    logp, ref = q.log_prob(x), p.log_prob(x)
    true_kl = torch.distributions.kl_divergence(q, p).item()
    assert abs(k1(logp, ref).mean().item() - true_kl) < 0.05 * true_kl + 2e-3
    assert abs(k3(logp, ref).mean().item() - true_kl) < 0.05 * true_kl + 2e-3


def test_k3_clamps_the_log_ratio():
    logp = torch.tensor([0.0, 0.0, -100.0, -5.0], requires_grad=True)
    ref = torch.tensor([-100.0, 100.0, 0.0, -5.0])
    out = k3(logp, ref, clamp=20.0)
    assert torch.isfinite(out).all()
    expect = [math.expm1(-20) + 20, math.expm1(20) - 20, math.expm1(20) - 20, 0.0]
    torch.testing.assert_close(out, torch.tensor(expect), rtol=1e-5, atol=0)
    out.sum().backward()
    # Clamped entries pass no gradient; unclamped: d k3 / d logp = 1 - r = 0 at r = 1.
    assert torch.equal(logp.grad, torch.zeros(4))


def test_gradients_match_fp64_autograd():
    logp = (torch.randn(40) - 2).requires_grad_()
    ref = logp.detach() + torch.randn(40) * torch.logspace(-4, 0, 40)
    for fn in (k1, k2, k3):
        lp = logp.detach().double().requires_grad_()
        log_r = ref.double() - lp
        expect = {k1: -log_r, k2: log_r**2 / 2, k3: torch.expm1(log_r) - log_r}[fn]
        (g64,) = torch.autograd.grad(expect.sum(), lp)
        (g32,) = torch.autograd.grad(fn(logp, ref).sum(), logp)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-6)
