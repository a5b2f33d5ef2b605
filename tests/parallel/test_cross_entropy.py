"""vocab_parallel_cross_entropy against F.cross_entropy and log_softmax + gather: values and
gradients, an odd (prime) vocabulary, ignored labels, bf16 logits, TP=1 and TP=2 over gloo."""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megarlhf.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.dist import run_ranks
from tests.kernels.helpers import assert_grad_close

V_REAL = 1009  # prime: a multiple of nothing
V_PAD = 1010  # padded to a multiple of TP=2 with finfo.min, as the model does


def _fresh_seed() -> int:
    """A new seed each run (printed, so a failure can be replayed by hard-coding it)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return seed


def _case(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 9, V_REAL, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V_REAL, (2, 9), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = V_REAL - 1
    weights = torch.randn(2, 9, generator=g)
    return logits, labels, weights


def _reference(logits, labels, weights):
    """F.cross_entropy (fp64) loss and its gradient w.r.t. the logits."""
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    loss = loss.view(labels.shape)
    (loss * weights.double()).sum().backward()
    return loss.detach(), x.grad


def _ours(logits, labels, weights, tp_group=None):
    x = logits.detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, labels, tp_group=tp_group)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


def _pad(logits):
    fill = torch.finfo(logits.dtype).min
    return torch.cat([logits, torch.full((*logits.shape[:-1], V_PAD - V_REAL), fill)], -1)


def test_tp1_matches_cross_entropy_and_log_softmax_gather():
    logits, labels, weights = _case(_fresh_seed())
    loss, grad = _ours(logits, labels, weights)
    ref_loss, ref_grad = _reference(logits, labels, weights)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad, ref_grad)
    keep = labels != -100
    gathered = -torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])
    torch.testing.assert_close(
        loss.double(), torch.where(keep, gathered[..., 0], 0.0), rtol=1e-5, atol=1e-5
    )
    assert (loss[~keep] == 0).all() and (grad[~keep] == 0).all()


def test_bf16_logits():
    logits, labels, weights = _case(_fresh_seed(), torch.bfloat16)
    loss, grad = _ours(logits, labels, weights)
    ref_loss, ref_grad = _reference(logits, labels, weights)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.bfloat16
    assert_grad_close(grad, ref_grad)


def _tp_rank(rank, world, seed):
    logits, labels, weights = _case(seed)
    shard = V_PAD // world
    local = _pad(logits)[..., rank * shard : (rank + 1) * shard]
    return _ours(local, labels, weights, tp_group=dist.group.WORLD)


def test_tp2_matches_tp1_and_cross_entropy():
    seed = _fresh_seed()
    logits, labels, weights = _case(seed)
    results = run_ranks(_tp_rank, 2, seed, timeout=120)
    ref_loss, ref_grad = _reference(logits, labels, weights)
    tp1_loss, tp1_grad = _ours(_pad(logits), labels, weights)
    grad = torch.cat([g for _, g in results], dim=-1)
    for loss, _ in results:
        torch.testing.assert_close(loss, tp1_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad, tp1_grad.double())
    assert_grad_close(grad[..., :V_REAL], ref_grad)
    assert (grad[..., V_REAL:] == 0).all()
