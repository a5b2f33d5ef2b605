"""PPO math against hand-computed values and plain-loop references."""

import math

import torch

from megarlhf.algos.kl_controller import KLController, adaptive_kl_update
from megarlhf.algos.ppo import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    loss_normalizer,
    ptx_loss,
    token_rewards,
    token_weights,
)
from megarlhf.algos.stats import explained_variance, masked_mean, masked_var, masked_whiten


def test_token_rewards_score_at_last_token_and_kl_everywhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([2.0, -3.0])
    rewards, kl, non_score = token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -1, 0, (masked)], row 1 [1, ...]
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    expect = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1 - 3.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expect)
    assert torch.allclose(non_score, -0.1 * kl)
    clipped, _, _ = token_rewards(scores, logp, ref, mask, 0.1, score_clip=1.0)
    assert clipped[0, 2] == 1.0 and clipped[1, 0] == -0.1 - 1.0


def test_policy_loss_matches_loop_reference():
    torch.manual_seed(0)
    logp, old = torch.randn(3, 5) * 0.3, torch.randn(3, 5) * 0.3
    adv = torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    per_token, stats = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    loss = aggregate(per_token, token_weights(mask, "token-mean"), float(mask.sum()))
    clipfrac = float((stats["clipped"] * mask).sum() / mask.sum())
    terms, clipped_count = [], 0
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                r = math.exp(logp[i, j] - old[i, j])
                a = adv[i, j].item()
                u, c = -a * r, -a * min(max(r, 0.8), 1.2)
                terms.append(max(u, c))
                clipped_count += c > u
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-6
    assert abs(clipfrac - clipped_count / len(terms)) < 1e-6


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    per_token, stats = clipped_value_loss(values, old, returns, clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1; clipped V = 0.7 -> 1.69: max 1.69. token 1: 1 and 1.
    assert torch.allclose(per_token, torch.tensor([[0.5 * 1.69, 0.5]]))
    assert abs(aggregate(per_token, mask, 2.0).item() - (0.5 * 1.69 + 0.5) / 2) < 1e-6
    assert stats["clipped"].tolist() == [[1.0, 0.0]]
    unclipped, _ = clipped_value_loss(values, old, returns, clip_range=0.0)
    assert torch.allclose(unclipped, torch.tensor([[0.5, 0.5]]))


def test_loss_aggregation_modes_by_hand():
    """Two micro-batches of one step, rows of 3 tokens: [a, b, -] [c, -, -] | [d, e, f]."""
    x1, m1 = (
        torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]]),
        torch.tensor([[1, 1, 0], [1, 0, 0.0]]),
    )
    x2, m2 = torch.tensor([[1.0, 1.0, 4.0]]), torch.ones(1, 3)
    total = lambda v: [sum(v)]  # noqa: E731 - one DP rank
    want = {
        "token-mean": (1 + 2 + 4 + 1 + 1 + 4) / 6,
        "seq-mean-token-sum": (3 + 4 + 6) / 3,
        "seq-mean-token-mean": (1.5 + 4 + 2) / 3,
        "seq-mean-token-sum-norm": (3 + 4 + 6) / (3 * 3),
    }
    for mode, value in want.items():
        n = loss_normalizer([m1, m2], mode, total)
        got = sum(aggregate(x, token_weights(m, mode), n) for x, m in ((x1, m1), (x2, m2)))
        assert abs(got.item() - value) < 1e-6, mode
    # The normalizer is summed over DP ranks: two ranks holding these masks double it.
    assert loss_normalizer([m1, m2], "token-mean", lambda v: [2 * v[0]]) == 12.0


def test_ptx_loss_is_the_scaled_mean_next_token_nll():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    assert ptx_loss(logp, 2.0, 4.0).item() == 2.0 * 4.0 / 4.0


def test_masked_stats_and_whitening():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(x, mask).item() == 3.0
    assert abs(masked_var(x, mask).item() - vals.var().item()) < 1e-6
    w = masked_whiten(x, mask)
    assert w[0, 2] == 0 and abs(masked_mean(w, mask).item()) < 1e-6
    assert abs(masked_var(w, mask).item() - 1.0) < 1e-4
    assert torch.equal(x, torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]))  # not mutated
    assert explained_variance(x, x, mask).item() == 1.0


def test_adaptive_kl_controller():
    assert adaptive_kl_update(0.1, kl=12.0, n_samples=100, target=6.0, horizon=1000) == 0.1 * 1.02
    assert abs(adaptive_kl_update(0.1, 5.7, 100, 6.0, 1000) - 0.1 * (1 - 0.05 * 0.1)) < 1e-12
    ctl = KLController(beta=0.02)
    ctl.update(kl=100.0, n_samples=64)
    assert ctl.beta == 0.02  # fixed
    ctl2 = KLController(beta=0.02, target=1.0, horizon=100)
    ctl2.load_state_dict(ctl2.state_dict())
    ctl2.update(kl=2.0, n_samples=50)
    assert abs(ctl2.beta - 0.02 * 1.1) < 1e-12


def test_whiten_with_global_moments_equals_whitening_the_whole_population():
    from megarlhf.algos.stats import whiten_with_moments

    x = torch.randn(10, dtype=torch.float64) * 3 + 1
    halves = x[:4], x[4:]  # as if two DP ranks held them
    total, total_sq = float(x.sum()), float((x * x).sum())
    out = torch.cat([whiten_with_moments(h, total, total_sq, 10, eps=0.0) for h in halves])
    assert torch.allclose(out, (x - x.mean()) / x.std(), atol=1e-12)
    pop = whiten_with_moments(x, total, total_sq, 10, unbiased=False, eps=0.0)
    assert torch.allclose(pop, (x - x.mean()) / x.std(unbiased=False), atol=1e-12)
