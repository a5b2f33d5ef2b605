"""Triton kernels against the fp64 truth and the Python GAE loop. Not collected on its own (the
name lacks `test_`): test_triton.py runs this file in a fresh interpreter with TRITON_INTERPRET=1
(it must be set before the kernel modules are imported), or natively when CUDA is present.

Shapes are small because the interpreter runs every program in Python; the tile sizes are forced
small too, so that V spans several BLOCK_V tiles with a ragged last one and rows a ragged block.
"""

import os

import pytest
import torch
from megarlhf.kernels import gae, logprobs_from_logits
from megarlhf.kernels import logprobs_triton as lt
from megarlhf.kernels.gae_ref import gae_python
from megarlhf.kernels.logprobs import local_labels, rows_view

from tests.kernels.helpers import FP32, assert_grad_close, random_case, truth

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs CUDA or TRITON_INTERPRET=1 (run through test_triton.py)",
    ),
    # exp/multiply of the -inf padding lanes is intended; numpy (the interpreter) warns about it
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _grads(logits, labels, w_lp, w_ent, temperature):
    x = logits.to(DEVICE).clone().requires_grad_()
    lp, ent = logprobs_from_logits(
        x, labels.to(DEVICE), temperature=temperature, return_entropy=True, backend="triton"
    )
    ((lp * w_lp.to(DEVICE)).sum() + (ent * w_ent.to(DEVICE)).sum()).backward()
    return lp.detach().cpu(), ent.detach().cpu(), x.grad.cpu()


def _truth_grads(logits, labels, w_lp, w_ent, temperature):
    x = logits.detach().double().requires_grad_()
    lp, ent = truth(x, labels, temperature)
    ((lp * w_lp.double()).sum() + (ent * w_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize(
    "shape,V,dtype,temperature",
    [
        ((1, 1), 1, torch.float32, 1.0),
        ((1, 3), 37, torch.float32, 0.7),
        ((3, 5), 301, torch.float32, 1.0),
        ((2, 7), 129, torch.bfloat16, 1.3),
    ],
)
def test_logprobs_match_truth(shape, V, dtype, temperature):
    logits, labels, w_lp, w_ent = random_case(shape, V, dtype=dtype)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, temperature)
    tlp, tent, tg = _truth_grads(logits, labels, w_lp, w_ent, temperature)
    torch.testing.assert_close(lp.double(), tlp, **FP32)
    torch.testing.assert_close(ent.double(), tent, **FP32)
    assert g.dtype == dtype
    assert_grad_close(g, tg)
    assert (g[labels == -100] == 0).all()


@pytest.mark.parametrize("block_n,block_v", [(4, 64), (1, 128), (8, 512)])
def test_ragged_tiles_and_strided_rows(block_n, block_v):
    """Direct kernel calls with forced tiles on a strided `[:, :-1]` view: V = 301 is 4.7 tiles
    of 64, N = 3 * 6 rows is 4.5 blocks of 4."""
    full, labels_full, _, _ = random_case((3, 7), 301)
    x3 = rows_view(full[:, :-1].to(DEVICE))
    assert x3.data_ptr() == full.to(DEVICE).data_ptr() or DEVICE == "cuda"
    labels = labels_full[:, 1:]
    lab, keep = local_labels(labels.to(DEVICE), 0, 301, -100)
    stats = lt.fwd_stats(x3, lab, 1.0, True, block_n=block_n, block_v=block_v).cpu()
    m, s, w, zy = stats
    lse, ent = m + s.log(), s.log() - w / s
    tlp, tent = truth(full[:, :-1], labels)
    keep = keep.cpu()
    torch.testing.assert_close(torch.where(keep, zy - lse, 0.0).double(), tlp.flatten(), **FP32)
    torch.testing.assert_close(torch.where(keep, ent, 0.0).double(), tent.flatten(), **FP32)
    g_lp = torch.where(keep, torch.randn(18), 0.0)
    grad = lt.bwd(
        x3,
        lab,
        lse.to(DEVICE),
        ent.to(DEVICE),
        g_lp.to(DEVICE),
        torch.zeros(18, device=DEVICE),
        1.0,
        block_n=block_n,
        block_v=block_v,
    ).cpu()
    x = full[:, :-1].double().requires_grad_()
    (truth(x, labels)[0].flatten() * g_lp.double()).sum().backward()
    assert_grad_close(grad.view(3, 6, 301), x.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_padded_columns(temperature):
    real, labels, w_lp, w_ent = random_case((2, 3), 61)
    logits = torch.cat([real, torch.full((2, 3, 3), torch.finfo(torch.float32).min)], -1)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, temperature)
    tlp, tent, tg = _truth_grads(real, labels, w_lp, w_ent, temperature)
    assert torch.isfinite(ent).all() and torch.isfinite(g).all()
    torch.testing.assert_close(lp.double(), tlp, **FP32)
    torch.testing.assert_close(ent.double(), tent, **FP32)
    assert (g[..., 61:] == 0).all()
    assert_grad_close(g[..., :61], tg)


@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (7, 19)])
def test_gae_matches_python_loop(B, T):
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = torch.rand(B, T) > 0.3
    if B >= 3:
        m[1] = False
        m[2] = True
    adv, ret = gae(r.to(DEVICE), v.to(DEVICE), m.to(DEVICE), 0.99, 0.95, backend="triton")
    e_adv, e_ret = gae_python(r.tolist(), v.tolist(), m.tolist(), 0.99, 0.95)
    torch.testing.assert_close(adv.cpu(), torch.tensor(e_adv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.cpu(), torch.tensor(e_ret), rtol=1e-5, atol=1e-5)
