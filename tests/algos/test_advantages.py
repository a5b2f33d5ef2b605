"""RLOO / GRPO advantages against hand-computed values."""

import pytest
import torch

from megarlhf.algos.advantages import group_advantages


def test_rloo_leave_one_out():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    got = group_advantages(r, 3, "rloo")
    want = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]
    assert torch.allclose(got, torch.tensor(want))
    assert torch.equal(r, torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]))  # not mutated


def test_grpo_standardized_per_group():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0])
    got = group_advantages(r, 2, "grpo", eps=0.0)
    s = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(got[:2], torch.tensor([-1.0, 1.0]) / s)
    assert torch.all(torch.isnan(got[2:]))  # eps=0 on a constant group; the default eps gives 0
    assert torch.equal(group_advantages(r, 2, "grpo")[2:], torch.zeros(2))


def test_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3, "rloo")
    with pytest.raises(ValueError, match="unknown estimator"):
        group_advantages(torch.zeros(4), 2, "ppo")
