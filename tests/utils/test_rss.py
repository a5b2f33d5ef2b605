"""Peak RSS of this process image, not of the process that started it."""

import subprocess
import sys

import torch

CHILD = "from megarlhf.utils.rss import peak_rss_bytes; print(peak_rss_bytes())"


def test_current_and_peak_follow_allocations():
    # In a fresh process: a long-lived one (pytest) may serve the tensor from memory it already
    # holds, and its RSS would not move.
    code = (
        "import torch; from megarlhf.utils.rss import peak_rss_bytes, rss_bytes; "
        "before = rss_bytes(); x = torch.ones(96 * 2**20 // 4); now = rss_bytes(); "
        "print(now - before, peak_rss_bytes() - now)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew, peak_over_now = map(int, out.stdout.split())
    assert grew >= 80 * 2**20  # 96 MiB, touched
    assert peak_over_now >= 0


def test_child_does_not_inherit_the_parent_peak():
    big = torch.ones(400 * 2**20 // 4)  # the parent holds 400 MiB when it forks
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child = int(out.stdout)
    # A bare interpreter with this module is tens of MiB; ru_maxrss would report > 400 MiB here.
    assert child < 200 * 2**20 < big.numel() * 4
