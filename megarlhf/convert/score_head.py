"""The scalar head (reward model, critic) <-> the `score` layer of HF `*ForSequenceClassification`.

Weights: our `head.weight` [n, h] is HF's `score.weight` [n, h], a plain table row (tables.py).
HF's score layer has no bias (`nn.Linear(h, n, bias=False)` in GPT-2, LLaMA and Mistral, and
transformers drops a `score.bias` tensor as an unexpected key), while ours has one: reward
normalization (`rm.normalize_files`) subtracts the demonstrations' mean reward from it. So:

- import: `head.bias` = 0, or the values a megarlhf export left in config.json as
  `megarlhf_score_bias` (so megarlhf -> HF -> megarlhf is bit-exact whatever the policy);
- export of a zero bias: nothing to decide, the export is bit-exact;
- export of a non-zero bias, by policy (`--score-bias`):
  "error" (the default): refused, with the value in the message;
  "fold" (gpt2): folded into the final LayerNorm's bias, the only input of the score layer:
      W (y + d) = W y + b   for   d = pinv(W) b
  so transformers' scores equal ours up to the dtype's rounding (the trunk's `ln_f.bias` is no
  longer bit-exact). LLaMA / Mistral have no bias before the score layer (RMSNorm), so there the
  bias cannot be folded;
  "drop": exported without it: transformers' scores are ours minus the bias (rankings, pairwise
  preferences and whitened PPO rewards are unchanged, absolute scores are not). The value stays
  in config.json as `megarlhf_score_bias` (transformers keeps it as an unused attribute) and is
  restored on import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megarlhf.config import ModelConfig
from megarlhf.convert.hf_config import ConversionError

# Our scalar head's bias: a megarlhf parameter with no HF tensor.
HEAD_BIAS = "head.bias"
# config.json key holding the bias that a "drop" export left out of the weights.
SCORE_BIAS_KEY = "megarlhf_score_bias"
SCORE_BIAS_POLICIES = ("error", "fold", "drop")
SEQ_CLS_NAME = "*ForSequenceClassification"


def imported_head_bias(hf_cfg: dict, cfg: ModelConfig) -> torch.Tensor:
    """`head.bias` [n] of an imported scalar-head model: 0, or the value a drop-export kept."""
    stored = hf_cfg.get(SCORE_BIAS_KEY)
    if stored is None:
        return torch.zeros(cfg.num_head_outputs, dtype=cfg.torch_dtype)
    if not isinstance(stored, list) or len(stored) != cfg.num_head_outputs:
        raise ConversionError(
            f"config.json: {SCORE_BIAS_KEY}={stored!r} is not a list of "
            f"{cfg.num_head_outputs} number(s) (one per label)"
        )
    # Stored as the bias's exact values (a float64 holds every fp32 / bf16 value).
    return torch.tensor(stored, dtype=torch.float64).to(cfg.torch_dtype)


def export_head_bias(
    cfg: ModelConfig, full_tensor: Callable[[str], torch.Tensor], policy: str, where: str
) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """What becomes of a scalar head's bias on export.

    Args:
        cfg: the model (head "scalar").
        full_tensor: name -> the checkpoint's full tensor (`head.bias` [n], `head.weight` [n, h],
            `final_norm.bias` [h] are read).
        policy: one of SCORE_BIAS_POLICIES (see the module docstring).
        where: the checkpoint, for messages.
    Returns:
        (tensors to export in place of the stored ones, the value for config.json's
        `megarlhf_score_bias` or None to leave the key out).
    Raises:
        ConversionError: a non-zero bias under "error", or "fold" where it cannot be folded.
    """
    if policy not in SCORE_BIAS_POLICIES:
        raise ConversionError(
            f"score bias policy {policy!r}: expected one of {SCORE_BIAS_POLICIES}"
        )
    bias = full_tensor(HEAD_BIAS)
    if not bool(bias.any()):
        return {}, None
    values = [float(v) for v in bias.double()]
    shown = ", ".join(f"{v:.6g}" for v in values)
    if policy == "drop":
        return {}, values
    if policy == "error":
        raise ConversionError(
            f"{where}: head.bias = [{shown}] is not zero and HF's {SEQ_CLS_NAME} score layer has "
            "no bias; pass --score-bias fold (gpt2: folded into ln_f.bias, transformers' scores "
            f"equal ours) or --score-bias drop (transformers' scores = ours - [{shown}]; kept "
            f"in config.json as {SCORE_BIAS_KEY} and restored on import)"
        )
    if cfg.family != "gpt2":
        raise ConversionError(
            f"{where}: head.bias = [{shown}] cannot be folded into a {cfg.family} model (RMSNorm "
            "has no bias before the score layer); use --score-bias drop"
        )
    return {"final_norm.bias": _folded_norm_bias(bias, full_tensor, where, shown)}, None


def _folded_norm_bias(bias, full_tensor, where: str, shown: str) -> torch.Tensor:
    """`final_norm.bias` + d with W d = b (least-norm d, computed in float64)."""
    w, b = full_tensor("head.weight").double(), bias.double()
    beta = full_tensor("final_norm.bias")
    d = torch.linalg.pinv(w) @ b
    if (w @ d - b).abs().max() > 1e-9 * (1.0 + b.abs().max()):
        raise ConversionError(
            f"{where}: head.bias = [{shown}] cannot be folded into ln_f.bias: head.weight has "
            "rank < num_head_outputs; use --score-bias drop"
        )
    return (beta.double() + d).to(beta.dtype)
