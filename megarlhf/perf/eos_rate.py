"""Random models that stop: make a GPT-2-family model emit EOS with a chosen probability per token.

The throughput benchmark's variable-length mode needs real EOS tokens from randomly initialized
models (ours and TRL's alike), so responses vary in length as trained ones do. With small random
weights every logit is near 0, so the EOS logit needs to be about
L = log(rate / (1 - rate) * (V - 1)) for EOS to take `rate` of the probability. A LayerNorm output
has no constant direction, but its bias does: adding c to the final norm's bias along hidden unit
0 and making the EOS row of the (tied) output layer (L / c) * e_0 gives EOS the logit
L * (1 + n / c) with n ~ N(0, 1) the normalized unit-0 activation: about `rate` per token, within
a factor of about e^(L / c) of it. Other tokens' logits move by c * (their unit-0 weight), about
N(0, (0.02 c)^2): they stay near 0. LLaMA-family models have no norm bias and are not supported.
"""

from __future__ import annotations

import math

import torch

# The norm-bias offset c: large enough that the EOS logit's noise (a factor e^(L / c)) is small.
BIAS = 8.0


def eos_logit(rate: float, vocab: int) -> float:
    """The EOS logit L that takes `rate` of the probability when the other logits are 0."""
    if not 0 < rate < 1:
        raise ValueError(f"eos rate {rate} not in (0, 1)")
    return math.log(rate / (1 - rate) * (vocab - 1))


@torch.no_grad()
def set_eos_rate(output_weight: torch.Tensor, norm_bias: torch.Tensor, eos_id: int, rate: float,
                 vocab: int) -> None:  # fmt: skip
    """Edit in place the output layer `output_weight` [V_pad, h] (tied: also the embedding) and
    the final norm's bias `norm_bias` [h] so that EOS has about `rate` probability per token."""
    target = eos_logit(rate, vocab)
    norm_bias[0] += BIAS
    output_weight[eos_id].zero_()
    output_weight[eos_id, 0] = target / BIAS
