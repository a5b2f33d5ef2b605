"""logprobs_from_logits on CPU backends (C++ and pure torch) against an fp64 F.log_softmax truth
and against the staged reference: awkward shapes, dtypes, temperature, padded vocabulary columns,
ignored labels, gradients, strided inputs, no mutation, no fp32 copy of the logits."""

import pytest
import torch
from megarlhf.kernels import kl_penalty, logprobs_from_logits, logprobs_torch
from megarlhf.kernels.logprobs import rows_view
from megarlhf.kernels.logprobs_ref import logprobs_reference
from torch.profiler import ProfilerActivity, profile

from tests.kernels.helpers import FP32, assert_grad_close, cpu_backends, random_case, truth

SHAPES = [  # (leading shape, V): B=1, T=1, V=1, odd V, V prime and not a multiple of any block
    ((1, 1), 1),
    ((1, 1), 7),
    ((1, 5), 33),
    ((3, 1), 1001),
    ((2, 7), 4099),
    ((13,), 257),
    ((2, 3, 2), 100),
    ((), 50),
]


def _grads(logits, labels, w_lp, w_ent, temperature, **kw):
    x = logits.clone().requires_grad_()
    lp, ent = logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True, **kw)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _truth_grads(logits, labels, w_lp, w_ent, temperature):
    x = logits.double().requires_grad_()
    lp, ent = truth(x, labels, temperature)
    ((lp * w_lp.double()).sum() + (ent * w_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape,V", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_truth(backend, shape, V, temperature):
    logits, labels, w_lp, w_ent = random_case(shape, V)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, temperature, backend=backend)
    tlp, tent, tg = _truth_grads(logits, labels, w_lp, w_ent, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    torch.testing.assert_close(lp.double(), tlp, **FP32)
    torch.testing.assert_close(ent.double(), tent, **FP32)
    assert_grad_close(g, tg)
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (g[ignored] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(backend, dtype):
    logits, labels, w_lp, w_ent = random_case((3, 9), 1003, dtype=dtype)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, 0.9, backend=backend)
    tlp, tent, tg = _truth_grads(logits, labels, w_lp, w_ent, 0.9)
    assert lp.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(lp.double(), tlp, **FP32)
    torch.testing.assert_close(ent.double(), tent, **FP32)
    assert_grad_close(g, tg)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocab_columns_have_zero_probability(backend, temperature, dtype):
    """finfo.min columns (TP padding; -inf once divided by a temperature < 1): exactly zero
    probability, finite entropy equal to that of the unpadded logits, exactly zero gradient."""
    V_real, pad = 997, 3
    real, labels, w_lp, w_ent = random_case((2, 5), V_real, dtype=dtype)
    logits = torch.cat([real, torch.full((2, 5, pad), torch.finfo(dtype).min, dtype=dtype)], -1)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, temperature, backend=backend)
    tlp, tent, tg = _truth_grads(real, labels, w_lp, w_ent, temperature)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(g).all()
    torch.testing.assert_close(lp.double(), tlp, **FP32)
    torch.testing.assert_close(ent.double(), tent, **FP32)
    assert (g[..., V_real:] == 0).all()
    assert_grad_close(g[..., :V_real], tg)


@pytest.mark.parametrize("backend", cpu_backends())
def test_staged_reference_and_backend_agree(backend):
    logits, labels, w_lp, w_ent = random_case((4, 6), 511)
    lp, ent, g = _grads(logits, labels, w_lp, w_ent, 1.3, backend=backend)
    x = logits.clone().requires_grad_()
    rlp, rent = logprobs_reference(x, labels, temperature=1.3)
    ((rlp * w_lp).sum() + (rent * w_ent).sum()).backward()
    torch.testing.assert_close(lp, rlp.detach(), **FP32)
    torch.testing.assert_close(ent, rent.detach(), **FP32)
    assert_grad_close(g, x.grad.double())


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_views_read_in_place(backend):
    """The usual shifted slice `logits[:, :-1]`, a transpose, and views that need a copy."""
    full, labels_full, w_lp, w_ent = random_case((3, 8), 301)
    cases = [
        (full[:, :-1], labels_full[:, 1:]),
        (full.transpose(0, 1), labels_full.t()),
        (full[:, ::2], labels_full[:, ::2]),
        (full[..., ::2], labels_full.clamp(max=150)),
        (full.view(3, 2, 4, 301).transpose(1, 2)[:, :, :1], labels_full.view(3, 4, 2)[..., :1]),
    ]
    for logits, labels in cases:
        w1, w2 = torch.randn(labels.shape), torch.randn(labels.shape)
        lp, ent, g = _grads(logits, labels, w1, w2, 1.0, backend=backend)
        tlp, tent, tg = _truth_grads(logits.contiguous(), labels, w1, w2, 1.0)
        torch.testing.assert_close(lp.double(), tlp, **FP32)
        torch.testing.assert_close(ent.double(), tent, **FP32)
        assert_grad_close(g, tg)
    # Views whose leading dims collapse to two strided dims are not copied.
    assert rows_view(full[:, :-1]).data_ptr() == full.data_ptr()
    assert rows_view(full.transpose(0, 1)).data_ptr() == full.data_ptr()


@pytest.mark.parametrize("backend", cpu_backends())
def test_inputs_not_mutated_and_return_conventions(backend):
    logits, labels, _, _ = random_case((2, 4), 64)
    ref = torch.randn(2, 4) - 4.0
    x = logits.clone().requires_grad_()
    snapshot = (x.detach().clone(), labels.clone(), ref.clone())
    lp = logprobs_from_logits(x, labels, backend=backend)
    assert isinstance(lp, torch.Tensor)
    lp2, ent = logprobs_from_logits(x, labels, return_entropy=True, backend=backend)
    lp3, kl = logprobs_from_logits(x, labels, ref_logprobs=ref, kl_estimator="k2", backend=backend)
    lp4, ent4, kl4 = logprobs_from_logits(
        x, labels, return_entropy=True, ref_logprobs=ref, backend=backend
    )
    (lp.sum() + ent.sum() + kl.sum() + kl4.sum()).backward()
    for before, after in zip(snapshot, (x.detach(), labels, ref), strict=True):
        assert torch.equal(before, after)
    for other in (lp2, lp3, lp4):
        assert torch.equal(lp, other)
    assert torch.equal(ent, ent4)
    keep = labels != -100
    torch.testing.assert_close(kl, torch.where(keep, kl_penalty(lp, ref, "k2"), 0.0))
    torch.testing.assert_close(kl4, torch.where(keep, kl_penalty(lp, ref, "k3"), 0.0))
    assert (kl[~keep] == 0).all() and (kl4[~keep] == 0).all()


def test_torch_backend_chunking(monkeypatch):
    """Many small chunks (and a ragged last one) give the same result as one chunk."""
    logits, labels, w_lp, w_ent = random_case((3, 11), 509)
    one = _grads(logits, labels, w_lp, w_ent, 0.8, backend="torch")
    monkeypatch.setattr(logprobs_torch, "_CHUNK_BYTES", 4 * 509 * 4)  # 4 rows per chunk
    many = _grads(logits, labels, w_lp, w_ent, 0.8, backend="torch")
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _peak_extra_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes through torch's CPU allocator while fn runs."""
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("backend", cpu_backends())
def test_forward_allocates_no_fp32_copy_of_logits(backend, monkeypatch):
    monkeypatch.setattr(logprobs_torch, "_CHUNK_BYTES", 128 << 10)
    logits = torch.randn(2, 256, 2048, dtype=torch.bfloat16, requires_grad=True)  # 2 MiB
    labels = torch.randint(0, 2048, (2, 256))
    logprobs_from_logits(logits, labels, return_entropy=True, backend=backend)  # warm up
    fp32_copy = logits.numel() * 4
    fused = _peak_extra_bytes(
        lambda: logprobs_from_logits(logits, labels, return_entropy=True, backend=backend)
    )
    naive = _peak_extra_bytes(
        lambda: torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])
    )
    assert naive >= fp32_copy  # the check can see a full-size fp32 tensor
    assert fused < fp32_copy / 4, (fused, fp32_copy)
