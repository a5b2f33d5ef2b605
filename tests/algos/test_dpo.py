"""DPO and IPO losses against an independent fp64 loop over pairs: values, gradients with respect
to the policy log-probs, statistics, mixed K, label smoothing; and the per-sequence log-prob sum."""

from __future__ import annotations

import math

import pytest
import torch

from megarlhf.algos.dpo import (
    PREFERENCE_LOSSES,
    dpo_pair_loss,
    ipo_pair_loss,
    preference_loss,
    sequence_logps,
)

SIZES = [2, 5, 3, 9, 2]  # K of each prompt


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 5
    reference = policy + torch.randn(n, generator=g, dtype=torch.float64) * 3
    ranks = torch.cat([torch.randperm(k, generator=g) + 1 for k in SIZES])
    return policy, reference, ranks


def _loop_loss(policy, reference, ranks, beta, loss, eps):
    """Mean over prompts of the mean over each prompt's pairs, written out pair by pair."""
    total, start = policy.new_zeros(()), 0
    for k in SIZES:
        prompt = policy.new_zeros(())
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                w, lo = (i, j) if ranks[i] < ranks[j] else (j, i)
                h = (policy[w] - reference[w]) - (policy[lo] - reference[lo])
                if loss == "dpo":
                    p = torch.sigmoid(beta * h)
                    prompt = prompt - (1 - eps) * torch.log(p) - eps * torch.log(1 - p)
                else:
                    prompt = prompt + (h - 1 / (2 * beta)) ** 2
        total = total + prompt / math.comb(k, 2)
        start += k
    return total / len(SIZES)


@pytest.mark.parametrize(
    "loss,beta,eps", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)]
)
def test_loss_and_gradient_equal_the_pair_loop(loss, beta, eps):
    policy, reference, ranks = _batch()
    before = (policy.clone(), reference.clone(), ranks.clone())
    x = policy.clone().float().requires_grad_(True)
    ref = reference.float().requires_grad_(True)
    losses, _ = preference_loss(x, ref, SIZES, ranks, beta, loss, eps)
    assert losses.shape == (len(SIZES),)
    losses.mean().backward()
    assert ref.grad is None  # the reference is a constant
    y = policy.clone().requires_grad_(True)
    want = _loop_loss(y, reference, ranks, beta, loss, eps)
    want.backward()
    assert losses.mean().item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-7)
    assert y.grad.abs().max() > 1e-3  # the check is not vacuous
    for a, b in zip((policy, reference, ranks), before, strict=True):
        assert torch.equal(a, b)  # inputs untouched


def test_statistics_count_pairs_and_implicit_rewards():
    policy, reference, ranks = _batch(1)
    beta = 0.3
    _, st = preference_loss(policy, reference, SIZES, ranks, beta)
    ratio, start = (policy - reference).tolist(), 0
    pairs = correct = 0
    margin = chosen = rejected = 0.0
    for k in SIZES:
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                w, lo = (i, j) if ranks[i] < ranks[j] else (j, i)
                pairs += 1
                correct += ratio[w] > ratio[lo]
                margin += beta * (ratio[w] - ratio[lo])
                chosen += beta * ratio[w]
                rejected += beta * ratio[lo]
        start += k
    assert st.pairs == pairs == sum(math.comb(k, 2) for k in SIZES)
    assert st.correct == correct and 0 < correct < pairs
    assert st.margin_sum == pytest.approx(margin, rel=1e-5)
    assert st.chosen_sum == pytest.approx(chosen, rel=1e-5)
    assert st.rejected_sum == pytest.approx(rejected, rel=1e-5)


def test_policy_equal_to_reference_gives_log2_and_ipo_offset():
    x = torch.randn(sum(SIZES))
    ranks = torch.cat([torch.randperm(k) + 1 for k in SIZES])
    dpo, st = preference_loss(x, x.clone(), SIZES, ranks, 0.1, "dpo")
    torch.testing.assert_close(dpo, torch.full_like(dpo, math.log(2)))
    assert st.correct == 0 and st.margin_sum == 0
    ipo, _ = preference_loss(x, x.clone(), SIZES, ranks, 0.1, "ipo")
    torch.testing.assert_close(ipo, torch.full_like(ipo, 25.0))  # (1 / (2 * 0.1))^2


def test_pair_losses_by_hand():
    m = torch.tensor([0.0, 2.0, -1.0])
    torch.testing.assert_close(
        dpo_pair_loss(m, 0.5), torch.log1p(torch.exp(-0.5 * m)), rtol=1e-6, atol=0
    )
    smooth = 0.8 * torch.log1p(torch.exp(-0.5 * m)) + 0.2 * torch.log1p(torch.exp(0.5 * m))
    torch.testing.assert_close(dpo_pair_loss(m, 0.5, 0.2), smooth, rtol=1e-6, atol=0)
    torch.testing.assert_close(ipo_pair_loss(m, 0.25), (m - 2.0) ** 2)
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo"}


def test_sequence_logps_sums_each_sequences_tokens():
    logps = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25], requires_grad=True)
    seq = torch.tensor([0, 0, 2, 2, 2])
    out = sequence_logps(logps, seq, 4)
    torch.testing.assert_close(out, torch.tensor([-3.0, 0.0, -3.75, 0.0]))
    out.sum().backward()
    torch.testing.assert_close(logps.grad, torch.ones(5))
