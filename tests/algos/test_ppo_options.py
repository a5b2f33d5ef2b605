"""The PPO options' math against hand-computed values and plain-loop references: dual-clip, the
missing-EOS and overlong score penalties, truncated importance weights, REINFORCE++ (-baseline).
"""

import math

import pytest
import torch

from megarlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    reinforce_advantages,
    reinforce_baseline_advantages,
)
from megarlhf.algos.ppo import (
    clipped_surrogate,
    missing_eos_penalties,
    overlong_penalties,
    truncated_is_weights,
)


def test_dual_clip_by_hand():
    # ratios 0.5, 2, 5 under A = -1; 5 under A = +2; eps 0.2, c = 3.
    ratio = torch.tensor([0.5, 2.0, 5.0, 5.0], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    old = torch.zeros(4, dtype=torch.float64)
    loss, st = clipped_surrogate(logp, old, adv, 0.2, dual_clip_c=3.0)
    # max(-A r, -A clip(r)): 0.8 (clipped), 2, 5, -2.4 (clipped); then min(., 3) where A < 0.
    assert torch.allclose(loss, torch.tensor([0.8, 2.0, 3.0, -2.4], dtype=torch.float64))
    assert st["dual_clipped"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert st["clipped"].tolist() == [1.0, 0.0, 0.0, 1.0]
    (g,) = torch.autograd.grad(loss.sum(), logp)
    # d/dlogp of -A r is -A r: 2 for the r = 2 token; the bounded and clipped ones are constant.
    assert torch.allclose(g, torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    plain, st0 = clipped_surrogate(logp, old, adv, 0.2)
    assert plain[2].item() == pytest.approx(5.0) and "dual_clipped" not in st0


def test_dual_clip_matches_loop_reference():
    torch.manual_seed(1)
    logp, old, adv = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    c, eps = 2.5, 0.2
    loss, st = clipped_surrogate(logp, old, adv, eps, dual_clip_c=c)
    for i in range(4):
        for j in range(6):
            r, a = math.exp(logp[i, j] - old[i, j]), adv[i, j].item()
            want = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            bounded = a < 0 and want > -c * a
            if a < 0:
                want = min(want, -c * a)
            assert loss[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert st["dual_clipped"][i, j].item() == float(bounded)
    assert st["dual_clipped"].sum() > 0  # the draw exercises the bound


def test_missing_eos_and_overlong_penalties_by_hand():
    has_eos = torch.tensor([True, False, True, False])
    assert missing_eos_penalties(has_eos, 1.5).tolist() == [0.0, 1.5, 0.0, 1.5]
    # L_max 10, L_buf 4, factor 2: free up to 6 tokens, then 0.5 per token, 2 at 10.
    lengths = torch.tensor([3.0, 6.0, 7.0, 8.0, 10.0])
    got = overlong_penalties(lengths, max_len=10, buffer_len=4, factor=2.0)
    assert got.tolist() == [0.0, 0.0, 0.5, 1.0, 2.0]
    assert got.dtype == torch.float32
    # The whole range is the buffer: linear from the first token.
    assert overlong_penalties(torch.tensor([0.0, 5.0]), 10, 10, 1.0).tolist() == [0.0, 0.5]


def test_truncated_is_weights_by_hand():
    gen = torch.tensor([[-1.0, -2.0, -3.0, -1.0]])
    old = gen + torch.tensor([[0.0, math.log(1.5), math.log(3.0), -math.log(2.0)]])
    old.requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, gen, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 1.5, 2.0, 0.0]]))  # capped at 2, masked
    assert not w.requires_grad
    # Unmasked, the below-one weight is kept (TIS truncates above only).
    assert truncated_is_weights(old, gen, torch.ones(1, 4), 2.0)[0, 3].item() == pytest.approx(0.5)


def _returns_loop(rewards, mask, gamma):
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            out[i, t] = sum(gamma ** (s - t) * rewards[i, s].item() for s in range(t, n))
    return out


def test_discounted_returns_match_loop():
    torch.manual_seed(2)
    rewards = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).float()
    junk = rewards.clone()
    junk[mask == 0] = 99.0  # rewards outside the mask never count
    for gamma in (1.0, 0.9):
        got = discounted_returns(junk, mask, gamma)
        assert torch.allclose(got.double(), _returns_loop(rewards, mask, gamma), atol=1e-6)
    adv, ret = reinforce_advantages(rewards, torch.zeros(3, 5), mask, gamma=1.0, lam=0.95)
    assert torch.equal(adv, ret)


def test_reinforce_baseline_by_hand():
    # Two prompts, K = 2: sequence rewards 3, 1 | 4, 0 (group means 2 and 2).
    rewards = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]).float()
    adv, ret = reinforce_baseline_advantages(
        rewards, torch.zeros(4, 3), mask, gamma=1.0, lam=0.95, group_size=2
    )
    # gamma 1: A_t = G_t - b; returns are G_t.
    g = torch.tensor([[3.0, 2.0, 0.0], [1.0, 0.5, 0.0], [4.0, 4.0, 4.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([2.0, 2.0, 2.0, 2.0])[:, None]
    assert torch.allclose(ret, g)
    assert torch.allclose(adv, (g - b) * mask)
    # gamma < 1: the baseline is taken off the last token's reward, so it is discounted too.
    adv9, _ = reinforce_baseline_advantages(
        rewards, torch.zeros(4, 3), mask, gamma=0.5, lam=0.95, group_size=2
    )
    assert adv9[0].tolist() == pytest.approx([1.0 + 0.5 * (2.0 - 2.0), 0.0, 0.0])
    assert adv9[2].tolist() == pytest.approx([(4.0 - 2.0) * 0.25, (4.0 - 2.0) * 0.5, 2.0])
    with pytest.raises(ValueError, match="k >= 2"):
        reinforce_baseline_advantages(rewards, rewards, mask, gamma=1, lam=1, group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        reinforce_baseline_advantages(rewards, rewards, mask, gamma=1, lam=1, group_size=3)


def test_registry_entries():
    r, rb = ADVANTAGE_ESTIMATORS["reinforce"], ADVANTAGE_ESTIMATORS["reinforce_baseline"]
    assert (r.needs_critic, r.whole_groups, r.min_group_size, r.always_whiten) == (
        False, False, 1, True,
    )  # fmt: skip
    assert (rb.needs_critic, rb.whole_groups, rb.min_group_size, rb.always_whiten) == (
        False, True, 2, True,
    )  # fmt: skip
    assert not any(ADVANTAGE_ESTIMATORS[k].always_whiten for k in ("gae", "rloo", "grpo"))
