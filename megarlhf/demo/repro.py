"""The CPU code paths the demo's numbers depend on, pinned. Imports no torch: `pin()` must run
before torch loads, since the libraries read these variables once, when they start.

The demo trains in fp32, and fp32 sums come out in a different last bit when a library takes a
different code path: ATen's vectorized kernels (softmax, norms, reductions) pick AVX2 or AVX-512
from the CPU, MKL's GEMM picks its branch from the CPU vendor and ISA, and every threaded
reduction splits its work by the thread count. One such bit, fed through a few thousand optimizer
steps and sampled responses, moves the demo's win rates by several points. Pinned to the paths
that every x86-64 machine this project runs on has (AVX2, 2 threads), the same command gives the
same numbers on an AMD EPYC and an Intel Sapphire Rapids; what differs there is the speed.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# The variables and their values. MKL_CBWR's STRICT also fixes MKL's results across thread counts.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}


def pin(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set PINNED_ENV in `environ` (this process's environment by default, so the tools the demo
    starts inherit it); returns the values it replaced (None where a variable was unset)."""
    env = os.environ if environ is None else environ
    old = {k: env.get(k) for k in PINNED_ENV}
    env.update(PINNED_ENV)
    return old


def fingerprint() -> str:
    """A hash of the bits of a small fp32 training computation (matmuls, LayerNorm, softmax,
    GELU, their gradients and one AdamW step): it changes when any pinned code path changes."""
    import hashlib

    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 384, generator=g)
    w1 = torch.randn(384, 1536, generator=g).mul_(0.05).requires_grad_()
    w2 = torch.randn(1536, 384, generator=g).mul_(0.05).requires_grad_()
    h = torch.nn.functional.layer_norm(x @ w1, (1536,))
    y = torch.nn.functional.gelu(h) @ w2
    loss = torch.log_softmax(y, -1).mean() + y.square().sum() * 1e-3
    loss.backward()
    opt = torch.optim.AdamW([w1, w2], lr=1e-3)
    opt.step()
    digest = hashlib.sha256()
    for t in (loss.detach(), w1.detach(), w2.detach()):
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]
