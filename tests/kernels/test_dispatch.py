"""Backend selection and `python -m megarlhf.report`."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from megarlhf.kernels import available_backends, backend_status
from megarlhf.kernels._dispatch import select_backend


def test_cpu_picks_the_cpp_ops_where_a_compiler_exists(monkeypatch):
    """The machine decides the expectation, not the dispatcher: with a C++ compiler on PATH (the
    project's set-up installs one; CI has it) the C++ ops must build and be picked for CPU
    tensors; without one, pure torch, and the status says why."""
    monkeypatch.delenv("MEGARLHF_KERNEL_BACKEND", raising=False)
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    status = {s.name: s for s in backend_status()}
    if compiler:
        assert status["cpp"].available, status["cpp"].detail
        assert select_backend(torch.device("cpu")) == "cpp"
        assert available_backends("cpu") == ["cpp", "torch"]
    else:
        assert not status["cpp"].available and status["cpp"].detail
        assert select_backend(torch.device("cpu")) == "torch"
    assert select_backend(torch.device("cpu"), "torch") == "torch"


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("MEGARLHF_KERNEL_BACKEND", "torch")
    assert select_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_backend(torch.device("cpu"), "cuda-magic")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="cannot run on cpu"):
            select_backend(torch.device("cpu"), "triton")


def test_report_lists_every_backend():
    proc = subprocess.run(
        [sys.executable, "-m", "megarlhf.report"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("backend ")) + 1 :]
    for name in ("triton", "cpp", "torch"):
        row = next(ln for ln in table if ln.startswith(name + " "))
        assert (" OK " in row) or (" missing " in row), row
    assert any(ln.startswith("ops on cpu tensors use: ") for ln in lines)
