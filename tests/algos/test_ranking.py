"""K-way ranking loss against an independent pair-by-pair computation, mixed K in one batch."""

import itertools
import math

import torch

from megarlhf.algos.ranking import kway_ranking_loss


def _pairwise_reference(scores, groups):
    """groups: list of (list of score indices, list of ranks); a plain loop over pairs."""
    total = 0.0
    for idx, ranks in groups:
        k = len(idx)
        acc = 0.0
        for a, b in itertools.combinations(range(k), 2):
            win, lose = (idx[a], idx[b]) if ranks[a] < ranks[b] else (idx[b], idx[a])
            acc = acc - torch.log(torch.sigmoid(scores[win] - scores[lose]))
        total = total + acc / math.comb(k, 2)
    return total / len(groups)


def test_kway_loss_matches_pairwise_reference_values_and_grads():
    sizes = [4, 2, 9, 3]
    scores = torch.randn(sum(sizes), dtype=torch.float64, requires_grad=True)
    ranks, groups, start = [], [], 0
    for k in sizes:
        r = (torch.randperm(k) + 1).tolist()
        ranks += r
        groups.append((list(range(start, start + k)), r))
        start += k
    loss, stats = kway_ranking_loss(scores, sizes, torch.tensor(ranks))
    (g,) = torch.autograd.grad(loss, scores)
    ref = _pairwise_reference(scores, groups)
    (g_ref,) = torch.autograd.grad(ref, scores)
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(g, g_ref, rtol=1e-12)
    assert stats["num_pairs"].item() == sum(math.comb(k, 2) for k in sizes)


def test_accuracy_counts_correctly_ordered_pairs():
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0, 5.0])  # prompt 1 (K=3), prompt 2 (K=2)
    ranks = torch.tensor([1, 3, 2, 1, 2])  # pairs: (0>1 ok), (0>2 ok), (2>1 wrong), (3>4 wrong)
    _, stats = kway_ranking_loss(scores, [3, 2], ranks)
    assert stats["accuracy"].item() == 0.5
