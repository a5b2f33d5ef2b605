"""tools/check_cuda.py on a machine without CUDA: one JSON line saying so, exit 0 (on a GPU
machine it runs its sections; see the tool's docstring)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the tool runs")
def test_without_cuda_one_json_line_and_exit_0():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/check_cuda.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"cuda": False, "reason": "no CUDA device"}
