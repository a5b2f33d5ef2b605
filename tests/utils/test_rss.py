"""Peak RSS of this process image, not of the process that started it."""

import subprocess
import sys

import torch

from megarlhf.utils.rss import peak_rss_bytes, rss_bytes

CHILD = "from megarlhf.utils.rss import peak_rss_bytes; print(peak_rss_bytes())"


def test_current_and_peak_follow_allocations():
    before = rss_bytes()
    x = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched
    assert rss_bytes() - before >= 80 * 2**20
    assert peak_rss_bytes() >= rss_bytes()
    del x


def test_child_does_not_inherit_the_parent_peak():
    big = torch.ones(400 * 2**20 // 4)  # the parent holds 400 MiB when it forks
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child = int(out.stdout)
    # A bare interpreter with this module is tens of MiB; ru_maxrss would report > 400 MiB here.
    assert child < 200 * 2**20 < big.numel() * 4
