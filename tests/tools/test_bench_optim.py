"""tools/bench_optim.py: every implementation timed on the same parameters, the ratios are the
ratios of the printed times, and the implementations it times agree with each other (the step
each takes is the same AdamW: tests/optim compares them to 1e-6)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_prints_each_impl_and_its_ratio():
    cmd = [sys.executable, "tools/bench_optim.py", "--params", "3000", "--steps", "2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["params"] == 3000 and out["torch_ms"] > 0 and out["fused_ms"] > 0
    for impl in ("fused", "cpu_adam"):
        if f"{impl}_ms" in out:
            want = round(out["torch_ms"] / out[f"{impl}_ms"], 2)
            assert out[f"{impl}_speedup_vs_torch"] == pytest.approx(want, abs=0.011)
        else:
            assert impl == "cpu_adam" and out["cpu_adam_error"]
