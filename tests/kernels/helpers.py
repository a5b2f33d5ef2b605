"""Shared test helpers: independent fp64 ground truth for log-probs/entropy, and backend lists."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megarlhf.kernels._dispatch import backend_status

# Tolerances. fp32: the 1e-5 relative (plus a 1e-5 absolute floor for values near 0).
# bf16/fp16 logits are upcast exactly, so log-probs and entropy keep the fp32 tolerance against
# the fp64 truth of the same (rounded) values. Gradients: 1e-5 relative per element plus 1e-5
# of the gradient's scale (fp32 rounding of z = x / temperature alone moves a zero gradient by
# ~3e-7 of the upstream weight; measured worst cases are below 1e-6 of the scale), and
# for bf16/fp16 gradients, which are rounded to the logits' dtype, also one ulp of that dtype
# (bf16 2^-7, fp16 2^-10 relative) per element.
FP32 = {"rtol": 1e-5, "atol": 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def assert_grad_close(g: torch.Tensor, expected: torch.Tensor) -> None:
    """g (logits' dtype) against an fp64 gradient, with the tolerances above."""
    # Floor 1: the upstream weights are O(1) (randn), and the rounding noise of a gradient scales
    # with them even where the gradient itself is ~0 (V = 1, or a peaked softmax).
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(
        g.double(),
        expected.to(g.dtype).double(),
        rtol=GRAD_RTOL[g.dtype],
        atol=1e-5 * scale,
    )


def cpu_backends() -> list:
    """Pytest params of the CPU backends (cpp skipped with the reason when it cannot build)."""
    cpp = next(s for s in backend_status() if s.name == "cpp")
    return [
        pytest.param(
            "cpp", marks=pytest.mark.skipif(not cpp.available, reason=f"cpp: {cpp.detail}")
        ),
        "torch",
    ]


def truth(logits, labels, temperature=1.0, ignore_index=-100):
    """fp64 (logp, entropy) by F.log_softmax over the whole vocabulary; 0 at ignored labels."""
    logp_all = F.log_softmax(logits.double() / temperature, dim=-1)
    keep = labels != ignore_index
    lp = logp_all.gather(-1, labels.clamp(min=0).long()[..., None])[..., 0]
    p = logp_all.exp()
    ent = -torch.where(p > 0, p * logp_all, 0.0).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def random_case(shape, V, dtype=torch.float32, ignore_frac=0.2, scale=3.0):
    """Logits `[*shape, V]` with a spread that gives non-uniform softmaxes, labels with some
    ignored (-100) positions, and upstream gradient weights for logp and entropy."""
    logits = (torch.randn(*shape, V) * scale).to(dtype)
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return logits, labels, torch.randn(shape), torch.randn(shape)
