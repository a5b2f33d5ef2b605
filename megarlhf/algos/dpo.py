"""Direct preference losses: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023), over K-way
rankings.

Each prompt contributes K completions ranked by a labeler (K = 2: a chosen/rejected pair). Every
completion is forwarded once; its summed response log-prob under the policy, log pi(y), and under
the frozen reference, log ref(y), give its log-ratio h(y) = log pi(y) - log ref(y), and its
implicit reward beta * h(y). All C(K, 2) within-prompt pairs (w ranked above l) are formed
afterwards, as for the reward model (`algos.ranking.ranking_pairs`), and the prompt's loss is the
mean over its pairs of

    dpo:  -(1 - eps) * log sigmoid(beta * (h_w - h_l)) - eps * log sigmoid(-beta * (h_w - h_l))
    ipo:  ((h_w - h_l) - 1 / (2 * beta))^2

where eps is `label_smoothing` (conservative DPO, Mitchell 2023: the labels are flipped with
probability eps; 0 is plain DPO). The batch loss is the mean over prompts; the trainer normalizes
by the prompts of the whole global batch.

Simplifications: log-probs are sums over the response tokens (EOS included) for both losses; IPO's
reference implementation in TRL averages them over the tokens instead, which rescales beta per
sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megarlhf.algos.ranking import ranking_pairs


def dpo_pair_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO's loss of each pair (conservative DPO with label_smoothing > 0).

    Args:
        margin: [P] h_w - h_l, the winner's log-ratio minus the loser's.
        beta: the KL coefficient (> 0).
        label_smoothing: probability eps that a pair's label is flipped, in [0, 0.5).
    Returns:
        [P] -(1 - eps) log sigmoid(beta * margin) - eps log sigmoid(-beta * margin).
    """
    z = beta * margin
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def ipo_pair_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO's loss of each pair: the squared distance of the margin from 1 / (2 beta).

    Args:
        margin: [P] h_w - h_l.
        beta: the regularization strength (IPO's tau, > 0).
        label_smoothing: unused (must be 0; the config refuses anything else).
    Returns:
        [P] (margin - 1 / (2 beta))^2.
    """
    return (margin - 0.5 / beta) ** 2


# Pair losses by name (`dpo.loss`): fn(margin [P], beta, label_smoothing) -> [P].
PREFERENCE_LOSSES = {"dpo": dpo_pair_loss, "ipo": ipo_pair_loss}


@dataclass(frozen=True)
class PreferenceStats:
    """Pair statistics of one batch (sums, detached, so micro-batches and ranks add them up).

    pairs: P; correct: pairs whose winner has the larger implicit reward (h_w > h_l);
    margin_sum: sum of beta * (h_w - h_l); chosen_sum / rejected_sum: sums of beta * h_w and
    beta * h_l over the pairs (a completion counts once per pair it is in).
    """

    pairs: float
    correct: float
    margin_sum: float
    chosen_sum: float
    rejected_sum: float


def sequence_logps(
    token_logps: torch.Tensor, token_seq: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Summed log-prob of each sequence from the log-probs of its scored tokens.

    Args:
        token_logps: [T] log-prob of each response token (packed: only the scored positions).
        token_seq: [T] index of the sequence each token belongs to, in [0, num_sequences).
        num_sequences: N.
    Returns:
        [N] fp32 (0 for a sequence without tokens); differentiable w.r.t. token_logps.
    """
    out = token_logps.new_zeros(num_sequences, dtype=torch.float32)
    return out.index_add(0, token_seq.to(out.device), token_logps.float())


def preference_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    group_sizes: list[int],
    ranks: torch.Tensor,
    beta: float,
    loss: str = "dpo",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, PreferenceStats]:
    """Per-prompt DPO / IPO losses of a batch of prompts with variable K.

    Args:
        policy_logps: [sum K] summed response log-prob of each completion under the policy
            (completions laid out prompt after prompt).
        reference_logps: [sum K] the same under the frozen reference (no gradient flows to it).
        group_sizes: K of each prompt.
        ranks: [sum K] labeler rank of each completion within its prompt (1 = best, no ties).
        beta: the loss's temperature (> 0).
        loss: a name of PREFERENCE_LOSSES.
        label_smoothing: conservative DPO's eps (dpo only).
    Returns:
        (losses [num_prompts]: each prompt's mean pair loss, stats over all pairs).
    """
    win, lose, owner = ranking_pairs(group_sizes, ranks.cpu())
    device = policy_logps.device
    win, lose, owner = (t.to(device) for t in (win, lose, owner))
    ratio = policy_logps.float() - reference_logps.detach().to(device).float()  # h [sum K]
    margin = ratio[win] - ratio[lose]
    pair_loss = PREFERENCE_LOSSES[loss](margin, beta, label_smoothing)
    per_prompt = pair_loss.new_zeros(len(group_sizes)).index_add(0, owner, pair_loss)
    pairs = torch.tensor([k * (k - 1) // 2 for k in group_sizes], dtype=pair_loss.dtype)
    m = margin.detach().double()
    stats = PreferenceStats(
        pairs=float(margin.numel()),
        correct=float((m > 0).sum()),
        margin_sum=float(beta * m.sum()),
        chosen_sum=float(beta * ratio.detach().double()[win].sum()),
        rejected_sum=float(beta * ratio.detach().double()[lose].sum()),
    )
    return per_prompt / pairs.to(device), stats
