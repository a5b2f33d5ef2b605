"""InstructGPT's K-way ranking loss for reward models.

Each prompt contributes K completions, ranked by a labeler. All C(K, 2) comparisons of one prompt
form ONE batch element: every completion is scored once and all pairs are formed afterwards, and
the prompt's loss is the mean over its pairs

    loss_prompt = -1 / C(K, 2) * sum_{(w, l)} log sigmoid(r_w - r_l)

The batch loss is the mean over prompts (batches are counted in prompts). K may differ per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_scores(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores read at each row's last non-padding token.

    Args:
        values: [b, s] or [b, s, n] per-token head outputs.
        mask: [b, s] 1 for real tokens (left or right padding).
    Returns:
        [b] or [b, n].
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * (positions + 1)).argmax(-1)  # index of the last 1 in each row
    index = last.view(-1, *([1] * (values.dim() - 1))).expand(-1, 1, *values.shape[2:])
    return values.gather(1, index).squeeze(1)


def ranking_pairs(group_sizes: list[int], ranks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Winner and loser indices of every within-prompt pair.

    Args:
        group_sizes: K of each prompt, in order; completions are laid out prompt after prompt.
        ranks: [sum K] rank of each completion within its prompt (1 = best, no ties).
    Returns:
        (winners [P], losers [P], prompt_of_pair [P]) with P = sum C(K, 2).
    """
    winners, losers, owner = [], [], []
    start = 0
    for g, k in enumerate(group_sizes):
        idx = torch.arange(start, start + k)
        i, j = torch.triu_indices(k, k, offset=1)
        better = ranks[idx[i]] < ranks[idx[j]]
        winners.append(torch.where(better, idx[i], idx[j]))
        losers.append(torch.where(better, idx[j], idx[i]))
        owner.append(torch.full((i.numel(),), g))
        start += k
    return torch.cat(winners), torch.cat(losers), torch.cat(owner)


def kway_ranking_loss(
    scores: torch.Tensor, group_sizes: list[int], ranks: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The K-way loss over a batch of prompts with variable K.

    Args:
        scores: [sum K] reward of each completion (one forward each).
        group_sizes: K per prompt.
        ranks: [sum K] labeler rank of each completion within its prompt (1 = best).
    Returns:
        (loss: scalar mean over prompts of the per-prompt mean pair loss,
         stats: {"accuracy": fraction of pairs ordered correctly (all pairs weighted equally),
                 "num_pairs": P, "margin": mean r_w - r_l}).
    """
    win, lose, owner = ranking_pairs(group_sizes, ranks.cpu())
    win, lose, owner = (t.to(scores.device) for t in (win, lose, owner))
    diff = scores[win] - scores[lose]
    pair_loss = -F.logsigmoid(diff)
    n_prompts = len(group_sizes)
    per_prompt = torch.zeros(n_prompts, dtype=pair_loss.dtype, device=scores.device)
    per_prompt = per_prompt.index_add(0, owner, pair_loss)
    pairs_per_prompt = torch.tensor(
        [k * (k - 1) // 2 for k in group_sizes], dtype=pair_loss.dtype, device=scores.device
    )
    loss = (per_prompt / pairs_per_prompt).mean()
    stats = {
        "accuracy": (diff > 0).float().mean().detach(),
        "num_pairs": torch.tensor(float(diff.numel())),
        "margin": diff.mean().detach(),
    }
    return loss, stats
