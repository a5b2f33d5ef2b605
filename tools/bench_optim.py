#!/usr/bin/env python
"""Time one AdamW step of each `optim.impl` on the same parameters, side by side, and print one
JSON line (median ms per step, and each against the plain torch AdamW).

    OMP_NUM_THREADS=1 python tools/bench_optim.py --params 14e6 --steps 20

The parameters are fp32 master weights (what every ZeRO stage steps on CPU), in matrices of
1024 x 1024 plus the remainder; gradients are fixed random values. `cpu_adam` is DeepSpeed's C++
CPU Adam (JIT-built into TORCH_EXTENSIONS_DIR on first use; skipped with the reason if it does
not build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megarlhf.config.optim import OptimConfig
from megarlhf.optim.adamw import build_optimizer


def _params(n: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    m = 1024 * 1024
    sizes = [m] * (n // m) + ([n % m] if n % m else [])
    out = []
    for s in sizes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * 1e-3
        out.append(p)
    return out


def time_impl(impl: str, n: int, steps: int) -> float:
    """Median seconds of one optimizer step (after 2 warm-up steps)."""
    params = _params(n)
    opt = build_optimizer([{"params": params, "weight_decay": 0.01}], OptimConfig(impl=impl))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=float, default=14e6, help="number of parameters")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    args = p.parse_args(argv)
    n, res = int(args.params), {"params": int(args.params), "threads": torch.get_num_threads()}
    for impl in ("torch", "fused", "cpu_adam"):
        try:
            res[f"{impl}_ms"] = round(1e3 * time_impl(impl, n, args.steps), 2)
        except Exception as e:  # cpu_adam without a compiler
            res[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:200]
    for impl in ("fused", "cpu_adam"):
        if f"{impl}_ms" in res:
            res[f"{impl}_speedup_vs_torch"] = round(res["torch_ms"] / res[f"{impl}_ms"], 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
