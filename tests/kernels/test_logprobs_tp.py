"""TP=2 over gloo equals TP=1: log-probs, entropy, KL and logits gradients of every CPU backend
and of the staged reference, with a padded odd vocabulary, ignored labels, a temperature, and
exactly two collectives (MAX, then one packed SUM) per forward and none in the backward."""

import torch
import torch.distributed as dist
from megarlhf.kernels import logprobs_from_logits
from megarlhf.kernels._cpp import cpu_ops_available
from megarlhf.kernels.logprobs_ref import logprobs_reference

from tests.dist import run_ranks
from tests.kernels.helpers import FP32, assert_grad_close, random_case

V_REAL, V_PAD = 1001, 1002  # the model pads the vocabulary to a multiple of TP with finfo.min
TEMPERATURE = 0.8


def _padded_case(shape=(3, 7), dtype=torch.float32):
    real, labels, w_lp, w_ent = random_case(shape, V_REAL, dtype=dtype)
    pad = torch.full((*shape, V_PAD - V_REAL), torch.finfo(dtype).min, dtype=dtype)
    labels[0, 0] = V_REAL - 1  # last real id: on the last rank, next to the padding
    labels[0, 1] = 0
    ref = torch.randn(shape) - 5.0
    return torch.cat([real, pad], -1), labels, w_lp, w_ent, ref


def _run(logits, labels, w_lp, w_ent, ref, group, backend):
    """(logp, entropy, kl, grad of the local logits); backend None is the staged reference."""
    x = logits.clone().requires_grad_()
    if backend is None:
        lp, ent = logprobs_reference(x, labels, tp_group=group, temperature=TEMPERATURE)
        kl = torch.zeros_like(lp)
    else:
        lp, ent, kl = logprobs_from_logits(
            x,
            labels,
            tp_group=group,
            temperature=TEMPERATURE,
            return_entropy=True,
            ref_logprobs=ref,
            backend=backend,
        )
    ((lp * w_lp).sum() + (ent * w_ent).sum() + kl.sum()).backward()
    return lp.detach(), ent.detach(), kl.detach(), x.grad


def _rank_fn(rank, world, case, backends):
    logits, labels, w_lp, w_ent, ref = case
    shard = logits.shape[-1] // world
    local = logits[..., rank * shard : (rank + 1) * shard]
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(str(op))
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    out = {}
    for backend in backends:
        calls.clear()
        x = local.clone().requires_grad_()
        logprobs_from_logits(x, labels, tp_group=dist.group.WORLD, backend=backend).sum().backward()
        collectives = list(calls)
        out[backend] = (
            *_run(local, labels, w_lp, w_ent, ref, dist.group.WORLD, backend),
            collectives,
        )
    out["reference"] = _run(local, labels, w_lp, w_ent, ref, dist.group.WORLD, None)
    return out


def test_tp2_equals_tp1():
    backends = ["torch"] + (["cpp"] if cpu_ops_available() else [])  # built before spawning
    case = _padded_case()
    logits, labels, w_lp, w_ent, ref = case
    results = run_ranks(_rank_fn, 2, case, backends, timeout=180)
    shard = V_PAD // 2
    for name in [*backends, "reference"]:
        one = _run(logits, labels, w_lp, w_ent, ref, None, None if name == "reference" else name)
        for rank, res in enumerate(results):
            lp, ent, kl, grad = res[name][:4]
            torch.testing.assert_close(lp, one[0], **FP32)
            torch.testing.assert_close(ent, one[1], **FP32)
            torch.testing.assert_close(kl, one[2], **FP32)
            assert_grad_close(grad, one[3][..., rank * shard : (rank + 1) * shard].double())
            assert torch.isfinite(grad).all()
        if name != "reference":
            # Forward: all-reduce MAX, then one packed all-reduce SUM; backward: nothing.
            for res in results:
                assert [c.split(".")[-1] for c in res[name][4]] == ["MAX", "SUM"], res[name][4]
    # Padded columns (on the last rank) get exactly zero gradient.
    assert (results[1]["torch"][3][..., V_REAL - shard :] == 0).all()
