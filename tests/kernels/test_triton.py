"""Runs the Triton kernel cases (triton_cases.py) in a fresh interpreter: with TRITON_INTERPRET=1
on a machine without CUDA, natively on one with CUDA.

triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when the kernel
module is imported, so it cannot be switched inside this pytest process (another test may have
imported the modules already); a subprocess gets it right whatever the import order.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_triton_kernels():
    pytest.importorskip("triton")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    cases = os.path.join("tests", "kernels", "triton_cases.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", cases],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
