"""The AdamW implementations against a hand-written decoupled-weight-decay Adam loop (fp64), over
several steps with weight decay on matrices only: the plain and fused torch AdamW always, and
DeepSpeed's C++ CPU Adam where its op builds (it is JIT-compiled and cached on first use)."""

from __future__ import annotations

import pytest
import torch

from megarlhf.config.optim import OptimConfig
from megarlhf.optim.adamw import build_optimizer

CFG = OptimConfig(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _reference(params, grads, steps):
    """Adam with decoupled weight decay, bias-corrected, in fp64."""
    out = []
    for p0, decay in params:
        p = p0.double().clone()
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        for t in range(1, steps + 1):
            g = grads[(id(p0), t)].double()
            p = p * (1 - CFG.lr * (CFG.weight_decay if decay else 0.0))
            m = CFG.beta1 * m + (1 - CFG.beta1) * g
            v = CFG.beta2 * v + (1 - CFG.beta2) * g * g
            mh, vh = m / (1 - CFG.beta1**t), v / (1 - CFG.beta2**t)
            p = p - CFG.lr * mh / (vh.sqrt() + CFG.eps)
        out.append(p)
    return out


def _run(impl: str, steps: int = 5):
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(17, 9, generator=g) for _ in range(2)]
    vecs = [torch.randn(9, generator=g)]
    params = [(t, True) for t in mats] + [(t, False) for t in vecs]
    grads = {(id(t), s): torch.randn(t.shape, generator=g) for t, _ in params
             for s in range(1, steps + 1)}  # fmt: skip
    live = [torch.nn.Parameter(t.clone()) for t, _ in params]
    groups = [{"params": live[:2], "weight_decay": CFG.weight_decay},
              {"params": live[2:], "weight_decay": 0.0}]  # fmt: skip
    opt = build_optimizer(groups, OptimConfig(**{**vars(CFG), "impl": impl}))
    for s in range(1, steps + 1):
        for p, (t, _) in zip(live, params, strict=True):
            p.grad = grads[(id(t), s)].clone()
        opt.step()
    return live, _reference(params, grads, steps)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_torch_adamw_matches_the_loop(impl):
    got, want = _run(impl)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6)


def test_auto_is_fused_for_bf16_and_plain_for_fp32():
    p = [torch.nn.Parameter(torch.zeros(3))]
    fused = build_optimizer([{"params": p}], OptimConfig(), "bf16")
    plain = build_optimizer([{"params": p}], OptimConfig(), "fp32")
    assert fused.defaults["fused"] and not plain.defaults["fused"]


def _cpu_adam_built() -> bool:
    """DeepSpeed's cpu_adam op is in the extensions cache (building it takes minutes, so the
    suite does not build it; `python -c "from deepspeed.ops.adam import DeepSpeedCPUAdam;
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])"` does)."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache/torch_extensions"))
    return any(root.glob("**/cpu_adam*.so"))


@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeed's cpu_adam op is not built here")
def test_deepspeed_cpu_adam_matches_the_loop():
    got, want = _run("cpu_adam")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6)


def test_cpu_info_is_queried_once_per_process():
    """cpu_adam's builder asks py-cpuinfo for its flags three times per optimizer (a subprocess
    each); after `_query_cpu_once` it answers from the first query, the same answer."""
    import cpuinfo

    from megarlhf.optim.adamw import _query_cpu_once

    _query_cpu_once()
    _query_cpu_once()  # idempotent: not wrapped twice
    fresh = cpuinfo.get_cpu_info.__wrapped__()
    assert not hasattr(cpuinfo.get_cpu_info.__wrapped__, "cache_info")
    first = cpuinfo.get_cpu_info()
    misses = cpuinfo.get_cpu_info.cache_info().misses
    assert cpuinfo.get_cpu_info() is first and cpuinfo.get_cpu_info.cache_info().misses == misses
    assert (first["arch"], first["flags"]) == (fresh["arch"], fresh["flags"])
